//! Heap held per DTLS session, as the relay configures its engine: counts
//! the bytes the server side allocates and keeps, for sessions after a
//! handshake and 20 records each way, and for sessions that have only
//! answered a ClientHello with the cookie exchange (a forged hello's cost).
//!
//! ```sh
//! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
//!   -subj /CN=localhost -keyout /tmp/key.pem -out /tmp/cert.pem
//! cargo run --release -p tessera-relay --example dtls_session_memory -- /tmp/cert.pem /tmp/key.pem
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use dimpl::{Dtls, DtlsCertificate, Output};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

/// Net bytes allocated while [`COUNTING`] is on, on this thread.
static NET: AtomicIsize = AtomicIsize::new(0);
thread_local!(static COUNTING: Cell<bool> = const { Cell::new(false) });

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            NET.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: the caller's layout contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.with(Cell::get) {
            NET.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` with its allocations counted (the server side's work).
fn server<T>(f: impl FnOnce() -> T) -> T {
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    r
}

fn drain(d: &mut Dtls, buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        match d.poll_output(buf) {
            Output::Packet(p) => out.push(p.to_vec()),
            Output::BufferTooSmall { needed } => buf.resize(needed, 0),
            Output::Timeout(_) => return out,
            _ => {}
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, cert, key] = &args[..] else { panic!("usage: dtls_session_memory CERT.pem KEY.pem (ECDSA, PKCS#8)") };
    let certificate = CertificateDer::from_pem_file(cert).expect("certificate").to_vec();
    let private_key = PrivatePkcs8KeyDer::from_pem_file(key).expect("PKCS#8 key").secret_pkcs8_der().to_vec();
    let pair = DtlsCertificate { certificate, private_key };
    // As the relay builds it (`DtlsSetup::new`).
    let relay = Arc::new(dimpl::Config::builder().require_client_certificate(false).handshake_timeout(Duration::from_secs(10)).build().expect("config"));
    let client_config = Arc::new(dimpl::Config::default());
    let n = 200;
    let mut buf = vec![0u8; 2048];
    let client = |now| {
        let mut c = Dtls::new_auto(client_config.clone(), pair.clone(), now);
        c.set_active(true);
        c.handle_timeout(now).expect("clock");
        c
    };

    let mut kept = Vec::new();
    for _ in 0..n {
        let now = Instant::now();
        let mut s = server(|| Dtls::new_auto(relay.clone(), pair.clone(), now));
        let mut c = client(now);
        let mut flight = drain(&mut c, &mut buf);
        while !flight.is_empty() {
            let back = server(|| {
                s.handle_timeout(now).expect("clock");
                flight.iter().for_each(|p| s.handle_packet(p).expect("handshake"));
                drain(&mut s, &mut buf)
            });
            back.iter().for_each(|p| c.handle_packet(p).expect("handshake"));
            flight = drain(&mut c, &mut buf);
        }
        for _ in 0..20 {
            c.send_application_data(&[7; 164]).expect("send");
            for p in drain(&mut c, &mut buf) {
                server(|| {
                    s.handle_packet(&p).expect("record");
                    s.send_application_data(&[8; 164]).expect("send");
                    drain(&mut s, &mut buf);
                });
            }
        }
        kept.push(s);
    }
    let established = NET.swap(0, Ordering::Relaxed);

    let mut pending = Vec::new();
    for _ in 0..n {
        let now = Instant::now();
        let hello = drain(&mut client(now), &mut buf);
        pending.push(server(|| {
            let mut s = Dtls::new_auto(relay.clone(), pair.clone(), now);
            s.handle_timeout(now).expect("clock");
            hello.iter().for_each(|p| s.handle_packet(p).expect("hello"));
            drain(&mut s, &mut buf);
            s
        }));
    }
    let waiting = NET.load(Ordering::Relaxed);
    let inline = size_of::<Dtls>();
    println!("per established session: {} bytes of heap + {inline} inline", established / n);
    println!("per session after the cookie exchange: {} bytes of heap + {inline} inline", waiting / n);
}
