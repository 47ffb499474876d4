"""A Python server for `handoff run`, standard library only:

    handoff run --listen 127.0.0.1:8080 -- python3 examples/python/server.py

It serves on the socket handoff passes as fd 3 (LISTEN_FDS, LISTEN_PID), says
it is ready with sd_notify("READY=1") on NOTIFY_SOCKET, as under systemd, and on
SIGTERM stops accepting, finishes the requests it holds and exits. It answers
with HTTP/1.0 semantics (one request per connection), so draining has no idle
keep-alive connection to close.
"""
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

VERSION = os.environ.get("APP_VERSION", "dev")
MAX_SLOW_MS = 60000


def sd_notify(state):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)
    return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/":
            return self.send(200, "Hello World !!!")
        if url.path == "/healthz":
            return self.send(200, "ok")
        if url.path.startswith("/hello/") and len(url.path) > len("/hello/"):
            return self.send(200, "Hello %s!!!" % unquote(url.path[len("/hello/"):]))
        if url.path == "/slow":
            try:
                ms = int(parse_qs(url.query).get("ms", [""])[0])
            except ValueError:
                ms = -1
            if not 0 <= ms <= MAX_SLOW_MS:
                return self.send(400, "ms must be an integer from 0 to %d" % MAX_SLOW_MS)
            time.sleep(ms / 1000)
            return self.send(200, "slept %d ms" % ms)
        self.send(404, "not found")

    def send(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Handoff-Pid", str(os.getpid()))
        self.send_header("Handoff-Version", VERSION)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("no socket from handoff (LISTEN_FDS/LISTEN_PID): run me with handoff run", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=3)
    httpd = ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
    httpd.socket.close()
    httpd.socket = sock
    httpd.daemon_threads = False  # server_close() waits for requests in flight

    def stop(signum, frame):
        threading.Thread(target=httpd.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sd_notify("READY=1")
    httpd.serve_forever(poll_interval=0.05)
    httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
