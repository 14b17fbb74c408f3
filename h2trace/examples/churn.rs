//! Connection-churn load for `cargo xtask bench`: a server and client threads in one process,
//! on one address (loopback inside the bench's private namespace), for a bounded time.
//!
//!   churn ADDR --threads T --seconds S --mode close|rst|keep|h2|pipe
//!   churn ADDR --mode hold --conns N --seconds S
//!
//! close: connect, one request/response, the client closes (FIN). rst: the same, closed with
//! SO_LINGER 0 (RST). keep: one connection per thread doing request/response for the whole
//! run (the no-churn control). h2: keep, framed as HTTP/2 (the client preface and SETTINGS,
//! then per exchange HEADERS + DATA on a new stream each way): what h2trace's frame walk costs
//! per request. pipe: no network at all, each thread writes 64 bytes into a pipe and reads them
//! back (what a tracer costs the rest of a host's reads and writes). Prints `exchanges=N
//! connections=M seconds=S` at the end.
//! hold: open N connections (2·N sockets), one request/response each, print `holding=N`, keep
//! them idle for S seconds, then close them all (the tracer's memory with many live sockets).
//! stuck: close, while N sockets (`--stuck N`, 2,000 by default) sit in CLOSE_WAIT for the
//! whole run, as behind a server that leaks them (what the diagnosis costs then).
//! `--peers N` (close and rst): the clients dial N addresses in turn, 127.0.x.y on ADDR's port
//! (ADDR should then be 0.0.0.0:PORT): a node talking to ever new peers.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const REQ: &[u8; 64] = &[b'q'; 64];
const RESP: &[u8; 64] = &[b'r'; 64];

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
/// HEADERS (3 bytes of header block) + DATA (64 bytes) on one stream.
const H2_EXCHANGE: usize = 9 + 3 + 9 + 64;

/// One HTTP/2 request or response: HEADERS and DATA on `stream`.
fn h2_message(stream: u32, body: &[u8; 64]) -> [u8; H2_EXCHANGE] {
    let mut m = [0u8; H2_EXCHANGE];
    let sid = stream.to_be_bytes();
    m[..9].copy_from_slice(&[0, 0, 3, 1, 4, sid[0], sid[1], sid[2], sid[3]]);
    m[9..12].copy_from_slice(&[0x82, 0x86, 0x84]);
    m[12..21].copy_from_slice(&[0, 0, 64, 0, 1, sid[0], sid[1], sid[2], sid[3]]);
    m[21..].copy_from_slice(body);
    m
}

fn serve(mut s: TcpStream, h2: bool) {
    if h2 {
        let mut hello = [0u8; 24 + 9];
        if s.read_exact(&mut hello).is_err() || s.write_all(&SETTINGS).is_err() {
            return;
        }
        let mut buf = [0u8; H2_EXCHANGE];
        while s.read_exact(&mut buf).is_ok() {
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
            if s.write_all(&h2_message(stream, RESP)).is_err() {
                break;
            }
        }
        return;
    }
    let mut buf = [0u8; 64];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(RESP).is_err() {
            break;
        }
    }
}

/// Open an HTTP/2 connection: the preface and SETTINGS, then the server's SETTINGS.
fn h2_connect(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(&SETTINGS);
    s.write_all(&hello).expect("preface");
    let mut settings = [0u8; 9];
    s.read_exact(&mut settings).expect("server SETTINGS");
    s
}

fn h2_exchange(s: &mut TcpStream, stream: u32) -> bool {
    let mut buf = [0u8; H2_EXCHANGE];
    s.write_all(&h2_message(stream, REQ)).is_ok() && s.read_exact(&mut buf).is_ok()
}

fn linger0(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn exchange(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    s.write_all(REQ).is_ok() && s.read_exact(&mut buf).is_ok()
}

/// Room for both ends of `conns` connections: beyond the usual soft limit of descriptors, up
/// to the hard one.
fn allow_descriptors(conns: usize) {
    let want = (2 * conns + 64) as libc::rlim_t;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = want.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    if lim.rlim_cur < want {
        eprintln!(
            "churn: {conns} connections need {want} descriptors, the limit is {}",
            lim.rlim_cur
        );
        std::process::exit(2);
    }
}

/// Both ends of `conns` connections, one exchange each, kept open for `seconds`.
fn hold(listener: &TcpListener, conns: usize, seconds: f64) {
    allow_descriptors(conns);
    let addr = listener.local_addr().unwrap();
    let start = Instant::now();
    let mut held = Vec::with_capacity(2 * conns);
    for _ in 0..conns {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(REQ).expect("request");
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 64];
        s.read_exact(&mut buf).expect("read request");
        s.write_all(RESP).expect("response");
        c.read_exact(&mut buf).expect("read response");
        held.push(c);
        held.push(s);
    }
    println!("holding={conns}");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    drop(held);
    println!(
        "exchanges={conns} connections={conns} seconds={:.3}",
        start.elapsed().as_secs_f64()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.into())
    };
    let addr: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .expect("usage: churn ADDR [--threads T] [--seconds S] [--mode close|rst|keep|h2|pipe]");
    let threads: usize = get("--threads", "2").parse().expect("--threads");
    let seconds: f64 = get("--seconds", "5").parse().expect("--seconds");
    let mode = get("--mode", "close");
    let peers: u32 = get("--peers", "1").parse().expect("--peers");

    let listener = Arc::new(TcpListener::bind(addr).expect("bind"));
    if mode == "hold" {
        let conns: usize = get("--conns", "50000").parse().expect("--conns");
        hold(&listener, conns, seconds);
        return;
    }
    let addr = listener.local_addr().unwrap();
    // Accepted and never closed once their clients have: CLOSE_WAIT until the end. The
    // clients only shut down their sending side and stay open (FIN_WAIT2), so that their
    // ports stay theirs: a client socket closed outright becomes an orphan, which the kernel
    // drops at once when the namespace's TIME_WAIT table is full (earlier runs fill it).
    // Its port is then free while the server still holds the connection in CLOSE_WAIT, and
    // every new connection that picks that port has its SYN answered with a challenge ACK
    // and waits for the SYN to go again: whole runs went at a tenth of the rate.
    let _stuck: Vec<(TcpStream, TcpStream)> = if mode == "stuck" {
        let n: usize = get("--stuck", "2000").parse().expect("--stuck");
        allow_descriptors(n);
        (0..n)
            .map(|_| {
                let c = TcpStream::connect(addr).expect("connect");
                c.shutdown(std::net::Shutdown::Write).expect("shutdown");
                (c, listener.accept().expect("accept").0)
            })
            .collect()
    } else {
        Vec::new()
    };
    let mode = if mode == "stuck" {
        "close".into()
    } else {
        mode
    };
    // Each client thread has at most one connection open: as many acceptors, each serving its
    // connection to the end, keep up without a thread per connection.
    let h2 = mode == "h2";
    for _ in 0..threads + 1 {
        let l = listener.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                serve(s, h2);
            }
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = Arc::new(AtomicU64::new(0));
    let connections = Arc::new(AtomicU64::new(0));
    let next_peer = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, exchanges, connections, mode, next_peer) = (
                stop.clone(),
                exchanges.clone(),
                connections.clone(),
                mode.clone(),
                next_peer.clone(),
            );
            std::thread::spawn(move || {
                let mut kept: Option<TcpStream> = None;
                let mut stream = 1u32;
                let mut pipe = (mode == "pipe").then(|| std::io::pipe().expect("pipe"));
                while !stop.load(Ordering::Relaxed) {
                    if let Some((r, w)) = &mut pipe {
                        let mut buf = [0u8; 64];
                        w.write_all(REQ).expect("pipe write");
                        r.read_exact(&mut buf).expect("pipe read");
                        exchanges.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if mode == "h2" {
                        let s = kept.get_or_insert_with(|| {
                            connections.fetch_add(1, Ordering::Relaxed);
                            h2_connect(addr)
                        });
                        if h2_exchange(s, stream) {
                            exchanges.fetch_add(1, Ordering::Relaxed);
                        }
                        stream += 2;
                        continue;
                    }
                    if mode == "keep" {
                        let s = kept.get_or_insert_with(|| {
                            connections.fetch_add(1, Ordering::Relaxed);
                            TcpStream::connect(addr).expect("connect")
                        });
                        if exchange(s) {
                            exchanges.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    let to = if peers > 1 {
                        let i =
                            (next_peer.fetch_add(1, Ordering::Relaxed) % u64::from(peers)) as u32;
                        let ip =
                            std::net::Ipv4Addr::new(127, 0, (i / 250) as u8, (i % 250 + 1) as u8);
                        SocketAddr::from((ip, addr.port()))
                    } else {
                        addr
                    };
                    let Ok(mut s) = TcpStream::connect(to) else {
                        continue; // out of ports for a moment: try again
                    };
                    connections.fetch_add(1, Ordering::Relaxed);
                    if exchange(&mut s) {
                        exchanges.fetch_add(1, Ordering::Relaxed);
                    }
                    if mode == "rst" {
                        linger0(&s);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "exchanges={} connections={} seconds={secs:.3}",
        exchanges.load(Ordering::Relaxed),
        connections.load(Ordering::Relaxed)
    );
}
