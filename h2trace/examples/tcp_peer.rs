//! A small TCP client/server for h2trace's kernel tests and for trying h2trace by hand:
//! `tcp_peer server ADDR:PORT COUNT REPLY_BYTES CLOSE` and
//! `tcp_peer client ADDR:PORT COUNT SEND_BYTES CLOSE`, where CLOSE says how this side ends
//! each connection after the exchange:
//!   close       close() at once (this side sends FIN first)
//!   rst         SO_LINGER 0, then close(): an abortive close (RST)
//!   wait-peer   read until the peer closes, then close()
//!   hold:MS     wait MS milliseconds (the peer's FIN leaves us in CLOSE_WAIT), then close()
//! The server prints `ready` on stdout once it listens.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

fn usage() -> ! {
    eprintln!("usage: tcp_peer server|client ADDR:PORT COUNT BYTES close|rst|wait-peer|hold:MS");
    std::process::exit(2);
}

fn finish(mut s: TcpStream, how: &str) {
    match how {
        "close" => {}
        "rst" => {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket fd and a correctly sized option value.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_LINGER");
        }
        "wait-peer" => {
            let mut buf = [0u8; 4096];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
        h => match h.strip_prefix("hold:").and_then(|ms| ms.parse().ok()) {
            Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
            None => usage(),
        },
    }
    drop(s);
}

fn read_exactly(s: &mut TcpStream, n: usize) {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("reading the peer's bytes");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [role, addr, count, bytes, how] = args.as_slice() else {
        usage()
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
    let count: usize = count.parse().unwrap_or_else(|_| usage());
    let bytes: usize = bytes.parse().unwrap_or_else(|_| usage());
    // The request is as long as the client says; the server learns it from a 4-byte prefix.
    match role.as_str() {
        "server" => {
            let l = TcpListener::bind(addr).expect("bind");
            println!("ready");
            std::io::stdout().flush().unwrap();
            for _ in 0..count {
                let (mut s, _) = l.accept().expect("accept");
                let mut len = [0u8; 4];
                s.read_exact(&mut len).expect("request length");
                read_exactly(&mut s, u32::from_be_bytes(len) as usize);
                s.write_all(&vec![b'r'; bytes]).expect("reply");
                finish(s, how);
            }
        }
        "client" => {
            let reply: usize = std::env::var("TCP_PEER_REPLY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            for _ in 0..count {
                let mut s = TcpStream::connect(addr).expect("connect");
                let mut req = (bytes as u32).to_be_bytes().to_vec();
                req.extend(vec![b'q'; bytes]);
                s.write_all(&req).expect("request");
                read_exactly(&mut s, reply);
                finish(s, how);
            }
        }
        _ => usage(),
    }
}
