//! Facts about this process and machine for reports: the generator's CPU
//! time, whole and per thread (so a saturated generator, or one saturated
//! generator thread, is visible), a server's resident memory, cores, RAM and
//! kernel.

use std::time::Duration;

/// CPU time used by this process so far (all threads).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    /// User time.
    pub user: Duration,
    /// System time.
    pub system: Duration,
}

impl CpuTime {
    /// This process's CPU time now, all threads together; zero if the
    /// kernel refuses.
    pub fn now() -> Self {
        Self::of(libc::RUSAGE_SELF)
    }

    /// The calling thread's CPU time now; zero if the kernel refuses.
    pub fn thread_now() -> Self {
        Self::of(libc::RUSAGE_THREAD)
    }

    fn of(who: libc::c_int) -> Self {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a full rusage into the pointer it is
        // given, which points to zeroed memory of the right type.
        let rc = unsafe { libc::getrusage(who, usage.as_mut_ptr()) };
        if rc != 0 {
            return Self::default();
        }
        // SAFETY: zeroed is a valid rusage, and getrusage succeeded.
        let usage = unsafe { usage.assume_init() };
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        Self {
            user: tv(usage.ru_utime),
            system: tv(usage.ru_stime),
        }
    }

    /// User plus system time.
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// CPU used since `earlier`, as percent of one core over `wall`.
    pub fn percent_since(&self, earlier: &CpuTime, wall: Duration) -> f64 {
        if wall.is_zero() {
            return 0.0;
        }
        let used = self.total().saturating_sub(earlier.total());
        100.0 * used.as_secs_f64() / wall.as_secs_f64()
    }
}

/// Resident and peak resident memory of process `pid` in KiB, from
/// `/proc/<pid>/status`; `None` when it cannot be read.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:").unwrap_or(0)))
}

/// Resident memory of `pid` and all its descendants, in KiB (a server that
/// forks workers is measured whole).
pub fn tree_rss_kib(pid: u32) -> Option<u64> {
    let mut total = rss_kib(pid)?.0;
    let mut stack = vec![pid];
    // Bounded: a process tree of more than 4096 processes is not measured past that.
    let mut seen = 0;
    while let Some(p) = stack.pop() {
        seen += 1;
        if seen > 4096 {
            break;
        }
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            total += rss_kib(c).map_or(0, |r| r.0);
            stack.push(c);
        }
    }
    Some(total)
}

/// The machine, for reports.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// Total RAM.
    pub mem_total_kib: u64,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu_model: String,
}

impl Machine {
    /// Reads the facts of this machine.
    pub fn detect() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_kib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        Self {
            cores,
            mem_total_kib,
            kernel,
            cpu_model,
        }
    }
}

/// Columns of the terminal on standard error, if it is one.
pub fn terminal_width() -> Option<usize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct passed by pointer.
    let rc = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

/// Raises the open-file limit to its hard maximum: every connection and
/// long-poll needs a descriptor.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_measurable() {
        let (rss, peak) = rss_kib(std::process::id()).expect("own /proc status");
        assert!(rss > 0 && peak >= rss);
        assert!(tree_rss_kib(std::process::id()).expect("own tree") >= rss);
        let before = CpuTime::now();
        // Burn a little CPU so the counter must move.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let after = CpuTime::now();
        assert!(after.total() > before.total());
        assert!(Machine::detect().cores >= 1);
    }

    #[test]
    fn thread_time_counts_only_the_calling_thread() {
        let burn = || {
            let mut x = 0u64;
            for i in 0..20_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        };
        let (process0, thread0) = (CpuTime::now(), CpuTime::thread_now());
        std::thread::scope(|s| {
            s.spawn(burn);
        });
        let (process1, thread1) = (CpuTime::now(), CpuTime::thread_now());
        let other = process1.total().saturating_sub(process0.total());
        let own = thread1.total().saturating_sub(thread0.total());
        // The other thread's work is in the process's time, not in ours.
        assert!(other > own, "process {other:?}, this thread {own:?}");
        burn();
        assert!(CpuTime::thread_now().total() > thread1.total());
    }
}
