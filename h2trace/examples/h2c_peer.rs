//! A minimal cleartext HTTP/2 (h2c) client and server for h2trace's kernel tests. They speak
//! only the framing layer (header blocks are opaque bytes, no HPACK), and they write and read
//! frames the awkward ways real stacks do, so that the kernel walk meets every case:
//! frame headers split across iovecs and across calls, DATA frames spanning many calls,
//! several frames per call, and every syscall family (write, writev, sendmsg, read, readv,
//! recvmsg).
//!
//!   h2c_peer server ADDR [--not-h2]
//!   h2c_peer client ADDR [--requests N] [--data B] [--not-h2] [--read-first]
//!
//! The server sends its SETTINGS (MAX_CONCURRENT_STREAMS 33) before it reads the preface, as
//! servers may. For each request the client sends HEADERS on the next odd stream, a DATA frame
//! of B bytes and a PING; the server answers with HEADERS and DATA on the same stream and acks
//! the PING. Then the client resets stream 1001 with CANCEL, the server sends
//! GOAWAY(NO_ERROR, last stream, "bye"), and both close.
//! `--not-h2`: the server's first bytes look like SETTINGS but the client never sends the
//! preface (h2trace must not take it for HTTP/2). `--read-first`: the client reads the server's
//! SETTINGS before it writes its preface (as a client whose reader runs first may, grpc-go's
//! among them). Everything is bounded by timeouts.
use std::{
    io::{IoSlice, IoSliceMut, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const ACK: u8 = 1;
const END_HEADERS: u8 = 4;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Write `parts` as one sendmsg(2) with one iovec each.
fn sendmsg(s: &TcpStream, parts: &[&[u8]]) {
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut _,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: a zeroed msghdr is valid; iov outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, 0) };
    assert_eq!(n, total as isize, "sendmsg");
}

/// Read exactly one frame, `step` bytes per read(2) (small steps split its header).
fn read_frame(s: &mut TcpStream, step: usize) -> (u8, u8, u32, Vec<u8>) {
    let mut hdr = [0u8; 9];
    read_exact_in(s, &mut hdr, step);
    let len = (usize::from(hdr[0]) << 16) | (usize::from(hdr[1]) << 8) | usize::from(hdr[2]);
    let mut payload = vec![0u8; len];
    read_exact_in(s, &mut payload, step.max(1000));
    let stream = u32::from_be_bytes([hdr[5], hdr[6], hdr[7], hdr[8]]) & 0x7fff_ffff;
    (hdr[3], hdr[4], stream, payload)
}

fn read_exact_in(s: &mut TcpStream, buf: &mut [u8], step: usize) {
    let mut at = 0;
    while at < buf.len() {
        let end = (at + step).min(buf.len());
        let n = s.read(&mut buf[at..end]).expect("read");
        assert!(n > 0, "peer closed early");
        at += n;
    }
}

fn server(addr: &str, not_h2: bool) {
    let l = TcpListener::bind(addr).expect("bind");
    println!("ready");
    let (mut s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // SETTINGS first, with write(2), before the preface arrives.
    s.write_all(&frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 33]))
        .unwrap();
    if not_h2 {
        let mut b = [0u8; 64];
        let n = s.read(&mut b).unwrap();
        s.write_all(&b[..n]).unwrap();
        return;
    }
    // The preface and the client's SETTINGS through readv(2), split over two buffers.
    let mut pre = [0u8; 24];
    let (a, b) = pre.split_at_mut(10);
    let mut got = 0;
    while got < 24 {
        let n = s
            .read_vectored(&mut [
                IoSliceMut::new(&mut a[got.min(10)..]),
                IoSliceMut::new(&mut b[got.saturating_sub(10)..]),
            ])
            .unwrap();
        assert!(n > 0);
        got += n;
    }
    assert_eq!(&pre, PREFACE);
    let mut last = 0;
    loop {
        let (ty, flags, stream, payload) = read_frame(&mut s, 4);
        match ty {
            SETTINGS if flags & ACK == 0 => s.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap(),
            HEADERS => last = stream,
            DATA => {
                // Response: HEADERS and DATA in one write.
                let mut out = frame(HEADERS, END_HEADERS, stream, b"\x88");
                out.extend(frame(DATA, 1, stream, &payload[..payload.len().min(300)]));
                s.write_all(&out).unwrap();
            }
            PING if flags & ACK == 0 => s.write_all(&frame(PING, ACK, 0, &payload)).unwrap(),
            RST_STREAM => break,
            _ => {}
        }
    }
    let mut goaway = last.to_be_bytes().to_vec();
    goaway.extend_from_slice(&0u32.to_be_bytes());
    goaway.extend_from_slice(b"bye");
    s.write_all(&frame(GOAWAY, 0, 0, &goaway)).unwrap();
    // Wait for the client to close first.
    let mut b = [0u8; 256];
    while s.read(&mut b).map(|n| n > 0).unwrap_or(false) {}
}

fn client(addr: &str, requests: u32, data: usize, not_h2: bool, read_first: bool) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let early = read_first.then(|| read_frame(&mut s, 4096));
    if not_h2 {
        s.write_all(b"hello, not http/2").unwrap();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b).unwrap();
        return;
    }
    // The preface and SETTINGS through writev(2), the SETTINGS header split across iovecs.
    let settings = frame(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0, 0, 4, 0, 1, 0, 0]);
    s.write_vectored(&[
        IoSlice::new(PREFACE),
        IoSlice::new(&settings[..4]),
        IoSlice::new(&settings[4..]),
    ])
    .map(|n| assert_eq!(n, PREFACE.len() + settings.len()))
    .unwrap();
    if let Some((ty, ..)) = early {
        assert_eq!(ty, SETTINGS, "the server's first frame");
        s.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap();
    }
    for i in 0..requests {
        let stream = 2 * i + 1;
        let headers = frame(HEADERS, END_HEADERS, stream, b"\x82\x86\x84");
        let body = frame(DATA, 1, stream, &vec![b'x'; data]);
        // HEADERS and the DATA header with sendmsg(2), each split in two iovecs; then the
        // DATA payload with write(2) in uneven pieces.
        sendmsg(&s, &[&headers[..3], &headers[3..], &body[..5], &body[5..9]]);
        for chunk in body[9..].chunks(777) {
            s.write_all(chunk).unwrap();
        }
        let ping = frame(PING, 0, 0, &(i as u64).to_be_bytes());
        sendmsg(&s, &[&ping[..7], &ping[7..]]);
        // Read until the response's DATA and the PING ack are in.
        let (mut data_in, mut ack_in) = (false, false);
        while !(data_in && ack_in) {
            let (ty, flags, _, _) = read_frame(&mut s, if i % 2 == 0 { 7 } else { 4096 });
            match ty {
                SETTINGS if flags & ACK == 0 => s.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap(),
                DATA => data_in = true,
                PING if flags & ACK != 0 => ack_in = true,
                _ => {}
            }
        }
    }
    s.write_all(&frame(RST_STREAM, 0, 1001, &8u32.to_be_bytes()))
        .unwrap();
    loop {
        let (ty, _, _, _) = read_frame(&mut s, 5);
        if ty == GOAWAY {
            break;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!(
            "usage: h2c_peer server ADDR [--not-h2] | client ADDR [--requests N] [--data B] [--not-h2] [--read-first]"
        );
        std::process::exit(2)
    };
    let (Some(mode), Some(addr)) = (args.first(), args.get(1)) else {
        usage()
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str, default: usize| {
        args.iter().position(|a| a == name).map_or(default, |i| {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage())
        })
    };
    match mode.as_str() {
        "server" => server(addr, flag("--not-h2")),
        "client" => client(
            addr,
            value("--requests", 3) as u32,
            value("--data", 40_000),
            flag("--not-h2"),
            flag("--read-first"),
        ),
        _ => usage(),
    }
}
