"""Drivers for h2trace's end-to-end tests: real gRPC (grpcio) and HTTP (requests) peers, used
the way applications use them. Every mode is bounded in count and time and talks only to the
address it is given (inside the test's private network namespaces).

  peers.py grpc-server HOST:PORT [--max-age-ms N]
  peers.py grpc-client HOST:PORT --calls N [--interval-ms M] [--channel-per-call] [--tls]
                       [--pause-after-first-ms M] [--deadline-s S]
  peers.py http-client URL --requests N [--pause-ms M] [--session] [--abandon] [--hold-ms M]
"""
import argparse
import sys
import time
from concurrent import futures

import grpc

SERVICE, METHOD = "h2trace.Echo", "Call"


def grpc_server(addr, max_age_ms):
    options = []
    if max_age_ms:
        # gRPC's connection age limit: the server sends GOAWAY when a connection reaches it.
        options += [
            ("grpc.max_connection_age_ms", max_age_ms),
            ("grpc.max_connection_age_grace_ms", 200),
        ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"pong:" + req)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    server.add_insecure_port(addr)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination(timeout=120)


def grpc_client(addr, calls, interval_ms, channel_per_call, tls, pause_after_first_ms, deadline_s):
    def call(channel):
        stub = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        try:
            return stub(b"ping" * 25, timeout=deadline_s, wait_for_ready=True)
        except grpc.RpcError as e:
            if not (tls or pause_after_first_ms):
                raise
            print(f"rpc failed as expected: {e.code()}", file=sys.stderr)

    if tls:
        # A TLS client against a plaintext server: every handshake fails, and the channel
        # retries with its reconnect backoff (shortened here so the test takes seconds).
        opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100)]
        channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(), options=opts)
    else:
        channel = None if channel_per_call else grpc.insecure_channel(addr)
    for i in range(calls):
        if i == 1 and pause_after_first_ms:
            time.sleep(pause_after_first_ms / 1000)
        elif i and interval_ms:
            time.sleep(interval_ms / 1000)
        if channel_per_call:
            # The anti-pattern: a new channel (and connection) for every RPC.
            with grpc.insecure_channel(addr) as ch:
                call(ch)
        else:
            call(channel)
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
    a = p.parse_args()
    if a.mode == "grpc-server":
        grpc_server(a.target, a.max_age_ms)
    elif a.mode == "grpc-client":
        grpc_client(a.target, a.calls, a.interval_ms, a.channel_per_call, a.tls, a.pause_after_first_ms, a.deadline_s)
    else:
        http_client(a.target, a.requests, a.pause_ms, a.session, a.abandon, a.hold_ms)


if __name__ == "__main__":
    sys.exit(main())
