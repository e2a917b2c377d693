//! The tokio side runtime and the bridge from shard threads into it.
//!
//! Tokio-only libraries (the scylla driver today) run on a small
//! multi-threaded tokio runtime owned by whoever needs it. Shard threads
//! (glommio executors) never touch tokio: they hand a `Send` future to
//! [`SideRuntime::call`] (blocking) or [`SideRuntime::call_async`] (awaiting
//! on any executor), which sends it over a bounded flume channel to a
//! dispatcher task on the runtime; the dispatcher spawns it, and its output
//! comes back over a one-slot flume channel.
//!
//! **Invariant**: every wait is bounded. A full queue, or a future still
//! running after `call_timeout` (it is then dropped on the runtime), is
//! reported as [`BridgeError`], never a hang. In-flight jobs are bounded by
//! the queue depth plus the number of callers waiting for replies.
//!
//! **API boundary**: no tokio type appears in this module's public API.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Extra wait of a blocking call beyond its deadline (see [`SideRuntime::call`]).
const REPLY_MARGIN: Duration = Duration::from_secs(1);

/// Why a bridged call produced no output.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("side runtime queue is full (waited {0:?})")]
    QueueFull(Duration),
    #[error("no reply from the side runtime within {0:?}")]
    Timeout(Duration),
    #[error("side runtime has stopped")]
    Stopped,
    #[error("cannot start the side runtime: {0}")]
    Start(std::io::Error),
}

/// A tokio runtime on its own threads plus the bounded queue into it.
pub struct SideRuntime {
    queue: Option<flume::Sender<Job>>,
    runtime: Option<tokio::runtime::Runtime>,
    call_timeout: Duration,
}

impl SideRuntime {
    /// Starts a runtime with `worker_threads` threads named `name`, fed by
    /// a queue of `queue_depth` jobs. Each call waits at most
    /// `call_timeout` for a queue slot and again for its reply.
    pub fn start(name: &str, worker_threads: usize, queue_depth: usize, call_timeout: Duration) -> Result<Self, BridgeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name(name)
            .enable_all()
            .build()
            .map_err(BridgeError::Start)?;
        let (queue, jobs) = flume::bounded::<Job>(queue_depth.max(1));
        // The dispatcher ends when the last sender is dropped (see Drop).
        runtime.spawn(async move {
            while let Ok(job) = jobs.recv_async().await {
                tokio::spawn(job);
            }
        });
        Ok(SideRuntime { queue: Some(queue), runtime: Some(runtime), call_timeout })
    }

    /// The longest a call waits for its reply.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    fn submit<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
        timeout: Duration,
    ) -> Result<flume::Receiver<Result<T, BridgeError>>, BridgeError> {
        let queue = self.queue.as_ref().ok_or(BridgeError::Stopped)?;
        let (reply_tx, reply_rx) = flume::bounded(1);
        // The deadline is enforced on the tokio side, so a reply always
        // arrives, and an async caller needs no timer of its own executor.
        let job: Job = Box::pin(async move {
            let out = tokio::time::timeout(timeout, fut).await.map_err(|_| BridgeError::Timeout(timeout));
            // The caller may be gone; its output is then dropped.
            let _ = reply_tx.send(out);
        });
        queue.send_timeout(job, timeout).map_err(|e| match e {
            flume::SendTimeoutError::Timeout(_) => BridgeError::QueueFull(timeout),
            flume::SendTimeoutError::Disconnected(_) => BridgeError::Stopped,
        })?;
        Ok(reply_rx)
    }

    /// Runs `fut` on the runtime and blocks the calling thread until it
    /// finishes or `call_timeout` passes. Must not be called from a thread
    /// of the side runtime itself. Build `fut` lazily (an `async` block):
    /// tokio leaf futures such as `tokio::time::sleep` panic when created
    /// outside the runtime.
    pub fn call<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T, BridgeError> {
        self.call_with_timeout(fut, self.call_timeout)
    }

    /// [`SideRuntime::call`] with its own deadline (start-up work).
    pub fn call_with_timeout<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static, timeout: Duration) -> Result<T, BridgeError> {
        let reply = self.submit(fut, timeout)?;
        // The job answers by its deadline; the margin only covers a runtime
        // too busy to run the timer, so a wedged runtime cannot hang a shard.
        let wait = timeout + REPLY_MARGIN;
        match reply.recv_timeout(wait) {
            Ok(out) => out,
            Err(flume::RecvTimeoutError::Timeout) => Err(BridgeError::Timeout(wait)),
            Err(flume::RecvTimeoutError::Disconnected) => Err(BridgeError::Stopped),
        }
    }

    /// Runs `fut` on the runtime; the returned future can be awaited on any
    /// executor (a glommio shard) and resolves to its output. Only a full
    /// queue makes the submission itself wait (at most `call_timeout`).
    pub fn call_async<T, F>(&self, fut: F) -> impl Future<Output = Result<T, BridgeError>> + use<T, F>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let submitted = self.submit(fut, self.call_timeout);
        async move {
            match submitted?.recv_async().await {
                Ok(out) => out,
                Err(flume::RecvError::Disconnected) => Err(BridgeError::Stopped),
            }
        }
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        // Closing the queue ends the dispatcher; running jobs get a short
        // grace period, then the runtime's threads are stopped.
        self.queue = None;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn side(call_timeout: Duration) -> SideRuntime {
        SideRuntime::start("test-side", 1, 4, call_timeout).expect("runtime")
    }

    #[test]
    fn calls_return_their_output_from_tokio() {
        let side = side(Duration::from_secs(5));
        let out = side
            .call(async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                7
            })
            .expect("call");
        assert_eq!(out, 7);
        // Awaited from another executor than tokio.
        let out = futures_lite::future::block_on(side.call_async(async {
            tokio::task::yield_now().await;
            8
        }))
        .expect("call_async");
        assert_eq!(out, 8);
    }

    #[test]
    fn a_slow_future_times_out_instead_of_hanging() {
        let side = side(Duration::from_millis(100));
        let start = Instant::now();
        let err = side.call(async { tokio::time::sleep(Duration::from_secs(30)).await }).expect_err("too slow");
        assert!(matches!(err, BridgeError::Timeout(_)), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        let err = futures_lite::future::block_on(side.call_async(async { tokio::time::sleep(Duration::from_secs(30)).await })).expect_err("too slow");
        assert!(matches!(err, BridgeError::Timeout(_)), "{err}");
        // The runtime is still usable afterwards.
        assert_eq!(side.call(async { 1 }).expect("call"), 1);
    }

    #[test]
    fn many_threads_share_one_runtime() {
        let side = std::sync::Arc::new(side(Duration::from_secs(5)));
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let side = side.clone();
                std::thread::spawn(move || (0..200u64).map(|j| side.call(async move { i * 1000 + j }).expect("call")).sum::<u64>())
            })
            .collect();
        let total: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        let expected: u64 = (0..8u64).map(|i| (0..200u64).map(|j| i * 1000 + j).sum::<u64>()).sum();
        assert_eq!(total, expected);
    }
}
