//! A small TCP client/server/proxy for h2trace's kernel tests and for trying h2trace by hand.
//! Requests are length-prefixed (4 bytes, big endian); each is answered with `--reply` bytes.
//!
//!   tcp_peer server ADDR [--conns N] [--reply B] [--requests K] [--max-age MS]
//!                        [--idle-timeout MS] [--then HOW] [--fork]
//!   tcp_peer client ADDR [--conns N] [--send B] [--reply B] [--requests K] [--interval MS]
//!                        [--then HOW] [--gap MS] [--gap-growth F] [--until-eof]
//!                        [--user-timeout MS] [--pause-after-first MS] [--handoff]
//!                        [--bind IP:PORT]
//!   tcp_peer proxy LISTEN UPSTREAM [--requests K] [--reply B]
//!
//! HOW says how a side ends a connection once its part is done:
//!   close       close() at once          rst        SO_LINGER 0, then close(): a RST
//!   wait-peer   read until the peer closes, then close()
//!   shutdown    shutdown(SHUT_WR), then close() at once (the kernel sets FIN_WAIT1/2 twice)
//!   hold:MS     wait MS milliseconds (a FIN from the peer leaves us in CLOSE_WAIT), then close()
//!   reject      (server) close at once without reading or answering
//! `--bind`: every connection from that address and port (IPv4, SO_REUSEADDR): a client that
//! takes the same port again while the server may still hold the old connection.
//! The server prints `ready` on stdout once it listens; with `--fork` a child process serves
//! each connection and prints `served PID PEER-PORT` when done. A client with
//! `--pause-after-first` prints `paused` when its first exchange is done and the pause begins.
//! Everything is bounded: counts, timeouts.
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

struct Opts {
    conns: usize,
    send: usize,
    reply: usize,
    requests: usize,
    interval_ms: u64,
    then: String,
    max_age_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    gap_ms: u64,
    gap_growth: f64,
    until_eof: bool,
    user_timeout_ms: Option<u32>,
    pause_after_first_ms: u64,
    fork: bool,
    handoff: bool,
    bind: Option<std::net::SocketAddrV4>,
}

fn usage(msg: &str) -> ! {
    eprintln!("tcp_peer: {msg}\nusage: see the comment at the top of h2trace/examples/tcp_peer.rs");
    std::process::exit(2);
}

fn parse(args: &[String]) -> Opts {
    let mut o = Opts {
        conns: 1,
        send: 100,
        reply: 100,
        requests: 1,
        interval_ms: 0,
        then: "close".into(),
        max_age_ms: None,
        idle_timeout_ms: None,
        gap_ms: 0,
        gap_growth: 1.0,
        until_eof: false,
        user_timeout_ms: None,
        pause_after_first_ms: 0,
        fork: false,
        handoff: false,
        bind: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--fork" {
            o.fork = true;
            continue;
        }
        if flag == "--handoff" {
            o.handoff = true;
            continue;
        }
        if flag == "--until-eof" {
            o.until_eof = true;
            continue;
        }
        let v = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let num = || {
            v.parse::<u64>()
                .unwrap_or_else(|_| usage(&format!("{flag} {v}: not a number")))
        };
        match flag.as_str() {
            "--conns" => o.conns = num() as usize,
            "--send" => o.send = num() as usize,
            "--reply" => o.reply = num() as usize,
            "--requests" => o.requests = num() as usize,
            "--interval" => o.interval_ms = num(),
            "--then" => o.then = v.clone(),
            "--max-age" => o.max_age_ms = Some(num()),
            "--idle-timeout" => o.idle_timeout_ms = Some(num()),
            "--gap" => o.gap_ms = num(),
            "--gap-growth" => {
                o.gap_growth = v
                    .parse()
                    .unwrap_or_else(|_| usage("--gap-growth: not a number"))
            }
            "--user-timeout" => o.user_timeout_ms = Some(num() as u32),
            "--pause-after-first" => o.pause_after_first_ms = num(),
            "--bind" => {
                o.bind = Some(
                    v.parse()
                        .unwrap_or_else(|_| usage(&format!("--bind {v}: not IPv4 IP:PORT"))),
                )
            }
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    o
}

fn setsockopt<T>(s: &TcpStream, level: i32, name: i32, v: T) {
    // SAFETY: a valid socket fd and a correctly sized option value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&v as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
}

fn finish(mut s: TcpStream, how: &str) {
    match how {
        "close" | "reject" => {}
        "rst" => setsockopt(
            &s,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        ),
        "shutdown" => s.shutdown(std::net::Shutdown::Write).unwrap(),
        "wait-peer" => {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = [0u8; 4096];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
        h => match h.strip_prefix("hold:").and_then(|ms| ms.parse().ok()) {
            Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
            None => usage(&format!("unknown --then {h}")),
        },
    }
}

/// Read one length-prefixed request; `None` at EOF, a reset or a timeout.
fn read_request(s: &mut TcpStream) -> Option<usize> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).ok()?;
    Some(n)
}

fn exchange(s: &mut TcpStream, send: usize, reply: usize) -> std::io::Result<()> {
    let mut req = (send as u32).to_be_bytes().to_vec();
    req.extend(vec![b'q'; send]);
    s.write_all(&req)?;
    let mut buf = vec![0u8; reply];
    s.read_exact(&mut buf)
}

fn server(addr: SocketAddr, o: &Opts) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| usage(&format!("bind {addr}: {e}")));
    if o.fork {
        // Children are reaped by the kernel.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    for _ in 0..o.conns {
        let (s, peer) = l.accept().expect("accept");
        if !o.fork {
            serve(s, o);
            continue;
        }
        // A pre-forking server's worker: the child serves the connection and says which.
        match unsafe { libc::fork() } {
            0 => {
                drop(l);
                serve(s, o);
                println!("served {} {}", std::process::id(), peer.port());
                std::io::stdout().flush().unwrap();
                std::process::exit(0);
            }
            -1 => usage("fork failed"),
            _ => drop(s),
        }
    }
}

fn serve(mut s: TcpStream, o: &Opts) {
    if o.then == "reject" {
        s.write_all(b"\x15\x03\x03\x00\x02\x02\x28").ok(); // a TLS handshake_failure alert
        return;
    }
    let born = Instant::now();
    let mut served = 0;
    loop {
        // Close at a fixed age, or after an idle period, whichever the options ask for.
        let mut limit = o.idle_timeout_ms.map(Duration::from_millis);
        if let Some(age) = o.max_age_ms {
            let left = Duration::from_millis(age).saturating_sub(born.elapsed());
            limit = Some(limit.map_or(left, |l| l.min(left)));
        }
        if limit == Some(Duration::ZERO) {
            break;
        }
        s.set_read_timeout(limit.or(Some(Duration::from_secs(30))))
            .unwrap();
        if read_request(&mut s).is_none() {
            break;
        }
        if s.write_all(&vec![b'r'; o.reply]).is_err() {
            break;
        }
        served += 1;
        if served >= o.requests && o.max_age_ms.is_none() && o.idle_timeout_ms.is_none() {
            break;
        }
    }
    finish(s, &o.then);
}

/// Connect to `addr` from `local`, which may be taken again (SO_REUSEADDR).
fn connect_from(local: std::net::SocketAddrV4, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    let SocketAddr::V4(to) = addr else {
        usage("--bind: IPv4 only")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(local))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(to))?;
    Ok(TcpStream::from(fd))
}

fn client(addr: SocketAddr, o: &Opts) {
    let mut gap = o.gap_ms as f64;
    for i in 0..o.conns {
        if i > 0 && gap > 0.0 {
            std::thread::sleep(Duration::from_millis(gap as u64));
            gap *= o.gap_growth;
        }
        let mut s = match o.bind {
            Some(local) => connect_from(local, addr),
            None => TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        }
        .expect("connect");
        if let Some(ms) = o.user_timeout_ms {
            setsockopt(&s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms);
        }
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        for r in 0..o.requests {
            // A socket handed over: after the first exchange a child process takes the
            // connection on; this process lets go of it and ends.
            if r == 1 && o.handoff {
                match unsafe { libc::fork() } {
                    0 => {}
                    -1 => usage("fork failed"),
                    _ => std::process::exit(0),
                }
            }
            if r == 1 && o.pause_after_first_ms > 0 {
                println!("paused");
                std::io::stdout().flush().unwrap();
                std::thread::sleep(Duration::from_millis(o.pause_after_first_ms));
            } else if r > 0 && o.interval_ms > 0 {
                std::thread::sleep(Duration::from_millis(o.interval_ms));
            }
            if let Err(e) = exchange(&mut s, o.send, o.reply) {
                // The peer closed (fixed age, idle timeout, rejection) or the path died.
                if !o.until_eof
                    && !matches!(
                        e.kind(),
                        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                    )
                {
                    eprintln!("tcp_peer client: {e}");
                }
                break;
            }
        }
        if o.until_eof {
            let mut buf = [0u8; 512];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
        finish(s, &o.then);
    }
}

/// Accepts one downstream connection and serves `--requests` requests on it, opening a new
/// upstream connection for each: a proxy without upstream keep-alive.
fn proxy(listen: SocketAddr, upstream: SocketAddr, o: &Opts) {
    let l = TcpListener::bind(listen).unwrap_or_else(|e| usage(&format!("bind {listen}: {e}")));
    println!("ready");
    std::io::stdout().flush().unwrap();
    let (mut down, _) = l.accept().expect("accept");
    for _ in 0..o.requests {
        let Some(n) = read_request(&mut down) else {
            break;
        };
        let mut up = TcpStream::connect(upstream).expect("upstream connect");
        exchange(&mut up, n, o.reply).expect("upstream exchange");
        drop(up);
        down.write_all(&vec![b'p'; o.reply])
            .expect("reply downstream");
    }
    finish(down, "wait-peer");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = |i: usize| -> SocketAddr {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage("missing or bad ADDR"))
    };
    match args.first().map(String::as_str) {
        Some("server") => server(addr(1), &parse(&args[2..])),
        Some("client") => client(addr(1), &parse(&args[2..])),
        Some("proxy") => proxy(addr(1), addr(2), &parse(&args[3..])),
        _ => usage("first argument: server, client or proxy"),
    }
}
