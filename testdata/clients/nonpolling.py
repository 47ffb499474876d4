#!/usr/bin/env python3
"""A non-polling HTTP/1.1 keep-alive client, for handoff's migration tests.

Each of --conns connections (one thread each, Python's http.client) sends
GET --path every --min..--max seconds, uniformly at random, reusing its
connection without ever checking it first: a request on a connection the
server has closed fails (nothing is retried). A response that says
"Connection: close" ends the connection; the next request opens a new one (a
new local port, a new segment of that connection).

Output is JSON, one object a line, on stdout:
  {"msg": "ready"}                     every connection got its first answer
  {"msg": "response", ...}             with --events: conn, port, pid, close
  {"msg": "failure", ...}              conn, port, kind, error
  {"msg": "summary", ...}              at the end: requests, ok, failed,
      failures (by kind), reconnects, and conns: for each connection its
      segments, one per local port: port, pids (the Handoff-Pid values seen),
      requests
It stops at SIGINT or SIGTERM (after the requests in flight), or after
--duration seconds, and exits 0 (1 when it could not start).
"""

import argparse
import http.client
import json
import random
import signal
import socket
import sys
import threading
import time

out_lock = threading.Lock()


def emit(obj):
    line = json.dumps(obj, separators=(",", ":"))
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def failure_kind(err):
    if isinstance(err, http.client.RemoteDisconnected):
        return "remote-disconnected"
    if isinstance(err, ConnectionResetError):
        return "reset"
    if isinstance(err, BrokenPipeError):
        return "broken-pipe"
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(err, http.client.BadStatusLine):
        return "bad-status-line"
    return type(err).__name__


class Stats:
    def __init__(self, n):
        self.lock = threading.Lock()
        self.requests = 0
        self.ok = 0
        self.failures = {}
        self.reconnects = 0
        self.segments = [[] for _ in range(n)]  # per connection: [{port, pids, requests}]
        self.first = [False] * n
        self.answered_once = 0
        self.ready = threading.Event()


def worker(i, args, host, port, stats, stop):
    conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
    seg = None
    # Spread the first requests over one period.
    if stop.wait(random.uniform(0, args.max)):
        return
    while True:
        with stats.lock:
            stats.requests += 1
        local = None
        try:
            conn.request("GET", args.path)
            # The socket exists once the request was written; the response
            # may close it (Connection: close), so read the port now.
            local = conn.sock.getsockname()[1]
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise http.client.HTTPException("status %d" % resp.status)
            pid = int(resp.getheader("Handoff-Pid", "0"))
            closing = resp.will_close
            with stats.lock:
                stats.ok += 1
                if seg is None or seg["port"] != local:
                    seg = {"port": local, "pids": [], "requests": 0}
                    stats.segments[i].append(seg)
                seg["requests"] += 1
                if pid not in seg["pids"]:
                    seg["pids"].append(pid)
                if not stats.first[i]:
                    stats.first[i] = True
                    stats.answered_once += 1
                    if stats.answered_once == len(stats.first):
                        stats.ready.set()
                if closing:
                    stats.reconnects += 1
            if args.events:
                emit({"msg": "response", "conn": i, "port": local, "pid": pid, "close": closing})
            if closing:
                conn.close()  # http.client did already; the next request reconnects
                seg = None
        except Exception as err:  # noqa: BLE001: every failure is counted, none retried
            kind = failure_kind(err)
            with stats.lock:
                stats.failures[kind] = stats.failures.get(kind, 0) + 1
            emit({"msg": "failure", "conn": i, "port": local, "kind": kind, "error": repr(err)})
            conn.close()
            seg = None
        if stop.wait(random.uniform(args.min, args.max)):
            conn.close()
            return


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", required=True, help="host:port")
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--min", type=float, default=0.3, help="seconds between requests, at least")
    ap.add_argument("--max", type=float, default=0.7, help="seconds between requests, at most")
    ap.add_argument("--path", default="/")
    ap.add_argument("--timeout", type=float, default=10.0, help="socket timeout of a request, seconds")
    ap.add_argument("--duration", type=float, default=120.0, help="stop after this many seconds")
    ap.add_argument("--events", action="store_true", help="print a line per response")
    args = ap.parse_args()
    host, _, port = args.addr.rpartition(":")
    if not host or not port.isdigit():
        print("nonpolling.py: --addr must be host:port", file=sys.stderr)
        return 1

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stats = Stats(args.conns)
    threads = [threading.Thread(target=worker, args=(i, args, host, int(port), stats, stop), daemon=True)
               for i in range(args.conns)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.duration
    announced = False
    # Short waits so that the signal handlers run promptly in this thread.
    while not stop.is_set() and time.monotonic() < deadline:
        if not announced and stats.ready.wait(0.05):
            announced = True
            emit({"msg": "ready"})
        elif announced:
            stop.wait(0.05)
    stop.set()
    for t in threads:
        t.join(args.timeout + 5)
    with stats.lock:
        emit({
            "msg": "summary",
            "requests": stats.requests,
            "ok": stats.ok,
            "failed": sum(stats.failures.values()),
            "failures": stats.failures,
            "reconnects": stats.reconnects,
            "conns": [{"conn": i, "segments": s} for i, s in enumerate(stats.segments)],
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
