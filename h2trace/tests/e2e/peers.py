"""Drivers for h2trace's end-to-end tests: real gRPC (grpcio) and HTTP (requests) peers, used
the way applications use them. Every mode is bounded in count and time and talks only to the
address it is given (inside the test's private network namespaces).

  peers.py grpc-server HOST:PORT [--max-age-ms N] [--delay-ms N] [--min-ping-interval-ms N]
                       [--max-concurrent-streams N] [--keepalive-ms N]
  peers.py grpc-client HOST:PORT --calls N [--interval-ms M] [--channel-per-call] [--tls]
                       [--pause-after-first-ms M] [--deadline-s S] [--expect-failures]
                       [--cancel-after-ms M] [--keepalive-ms N] [--hold-ms M]
  peers.py http-client URL --requests N [--pause-ms M] [--session] [--abandon] [--hold-ms M]

Servers print `ready` once they listen; a client with --pause-after-first-ms prints `paused`
when its first call is done and the pause begins.
"""
import argparse
import sys
import time
from concurrent import futures

import grpc

SERVICE, METHOD = "h2trace.Echo", "Call"


def grpc_server(addr, max_age_ms, delay_ms=0, min_ping_interval_ms=0, max_concurrent_streams=0, keepalive_ms=0):
    options = []
    if max_age_ms:
        # gRPC's connection age limit: the server sends GOAWAY when a connection reaches it.
        options += [
            ("grpc.max_connection_age_ms", max_age_ms),
            ("grpc.max_connection_age_grace_ms", 200),
        ]
    if min_ping_interval_ms:
        # Keepalive enforcement: a client that pings more often than this (without data in
        # flight) earns strikes, and past max_ping_strikes a GOAWAY ENHANCE_YOUR_CALM
        # "too_many_pings". Permitting pings without calls makes this interval (not 2 hours)
        # the limit on an idle connection too.
        options += [
            ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    if keepalive_ms:
        # Server keepalive: the server PINGs every keepalive_ms, with or without calls (no
        # floor: 200 gives a PING every ~200 ms).
        options += [
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    if max_concurrent_streams:
        # Advertised in the server's SETTINGS as MAX_CONCURRENT_STREAMS.
        options += [("grpc.max_concurrent_streams", max_concurrent_streams)]

    def answer(req, ctx):
        if delay_ms:
            # A slow handler: a client deadline shorter than this expires. Both sides time the
            # deadline (grpc-timeout), so the client's RST_STREAM CANCEL races the server's
            # DEADLINE_EXCEEDED trailers + RST_STREAM NO_ERROR; --cancel-after-ms doesn't race.
            time.sleep(delay_ms / 1000)
        return b"pong:" + req

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    handler = grpc.unary_unary_rpc_method_handler(answer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    server.add_insecure_port(addr)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination(timeout=120)


def grpc_client(addr, calls, interval_ms, channel_per_call, tls, pause_after_first_ms, deadline_s,
                expect_failures=False, keepalive_ms=0, hold_ms=0, cancel_after_ms=0):
    def call(channel):
        stub = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        try:
            if cancel_after_ms:
                # The application gives up on the call itself (RST_STREAM CANCEL), with no
                # deadline race against the server (which also enforces grpc-timeout).
                fut = stub.future(b"ping" * 25, timeout=deadline_s, wait_for_ready=True)
                try:
                    return fut.result(timeout=cancel_after_ms / 1000)
                except grpc.FutureTimeoutError:
                    fut.cancel()
                    print("rpc cancelled", file=sys.stderr)
                    return None
            return stub(b"ping" * 25, timeout=deadline_s, wait_for_ready=True)
        except grpc.RpcError as e:
            if not (tls or pause_after_first_ms or expect_failures):
                raise
            print(f"rpc failed as expected: {e.code()}", file=sys.stderr)

    opts = []
    if keepalive_ms:
        # Client keepalive: PING every keepalive_ms, even with no call in flight and no
        # data sent in between (grpc's default would stop after 2 data-less pings). grpc core
        # spaces a client's PINGs at least 1 s apart, whatever keepalive_ms says.
        opts += [
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    if tls:
        # A TLS client against a plaintext server: every handshake fails, and the channel
        # retries with its reconnect backoff (shortened here so the test takes seconds).
        opts += [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100)]
        channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(), options=opts)
    else:
        channel = None if channel_per_call else grpc.insecure_channel(addr, options=opts)
    for i in range(calls):
        if i == 1 and pause_after_first_ms:
            # Tells the test that the first call is done and the pause begins.
            print("paused", flush=True)
            time.sleep(pause_after_first_ms / 1000)
        elif i and interval_ms:
            time.sleep(interval_ms / 1000)
        if channel_per_call:
            # The anti-pattern: a new channel (and connection) for every RPC.
            with grpc.insecure_channel(addr, options=opts) as ch:
                call(ch)
        else:
            call(channel)
    if hold_ms:
        # The channel (and its connection) stays open after the last call: keepalive
        # pings, or the server's GOAWAY, happen meanwhile.
        time.sleep(hold_ms / 1000)
    if channel:
        channel.close()


def http_client(url, requests_n, pause_ms, session, abandon, hold_ms):
    import requests

    s = requests.Session() if session else requests
    for i in range(requests_n):
        if i and pause_ms:
            time.sleep(pause_ms / 1000)
        r = s.get(url, timeout=5, stream=abandon)
        r.raise_for_status()
        if abandon:
            # Give up on a large response without reading it: closing a socket with unread
            # data makes the kernel reset the connection.
            r.close()
    if hold_ms:
        # The pooled connection stays open (and, once the server closes it, in CLOSE_WAIT).
        time.sleep(hold_ms / 1000)
    if session:
        s.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["grpc-server", "grpc-client", "http-client"])
    p.add_argument("target")
    p.add_argument("--max-age-ms", type=int, default=0)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--interval-ms", type=int, default=0)
    p.add_argument("--channel-per-call", action="store_true")
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--pause-ms", type=int, default=0)
    p.add_argument("--session", action="store_true")
    p.add_argument("--abandon", action="store_true")
    p.add_argument("--hold-ms", type=int, default=0)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--pause-after-first-ms", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=5)
    p.add_argument("--expect-failures", action="store_true")
    p.add_argument("--delay-ms", type=int, default=0)
    p.add_argument("--min-ping-interval-ms", type=int, default=0)
    p.add_argument("--max-concurrent-streams", type=int, default=0)
    p.add_argument("--keepalive-ms", type=int, default=0)
    p.add_argument("--cancel-after-ms", type=int, default=0)
    a = p.parse_args()
    # Bounded: at most 1000 calls or requests, and nothing sleeps or holds for over a minute.
    if not (0 <= a.calls <= 1000 and 0 <= a.requests <= 1000):
        p.error("--calls and --requests must be between 0 and 1000")
    for name in ("delay_ms", "hold_ms", "keepalive_ms", "interval_ms", "pause_after_first_ms", "pause_ms",
                 "cancel_after_ms", "max_age_ms", "min_ping_interval_ms"):
        if not 0 <= getattr(a, name) <= 60_000:
            p.error(f"--{name.replace('_', '-')} must be between 0 and 60000")
    if a.mode == "grpc-server":
        grpc_server(a.target, a.max_age_ms, a.delay_ms, a.min_ping_interval_ms, a.max_concurrent_streams,
                    a.keepalive_ms)
    elif a.mode == "grpc-client":
        grpc_client(a.target, a.calls, a.interval_ms, a.channel_per_call, a.tls, a.pause_after_first_ms,
                    a.deadline_s, a.expect_failures, a.keepalive_ms, a.hold_ms, a.cancel_after_ms)
    else:
        http_client(a.target, a.requests, a.pause_ms, a.session, a.abandon, a.hold_ms)


if __name__ == "__main__":
    sys.exit(main())
