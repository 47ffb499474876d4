"""Run an ASGI app with uvicorn under `handoff run`, losing no request:

    handoff run --listen 127.0.0.1:8080 -- python3 examples/uvicorn/serve.py app:app

(run from examples/uvicorn, or with --app-dir; see README.md beside it.)

It is uvicorn (0.17, h11), configured as `uvicorn --fd 3` would be, with two
additions that `uvicorn --fd 3` lacks:

- Readiness: sd_notify("READY=1") on NOTIFY_SOCKET once uvicorn serves on the
  socket (after the ASGI lifespan startup), as under systemd.
- A drain that loses nothing. On SIGTERM uvicorn stops accepting and closes
  every connection that has no response in progress at once, without reading
  what is in it: a request the client has sent and uvicorn has not read yet
  (it is often behind while the new child starts) is lost, and so is one sent
  on an idle keep-alive connection just before. Here a connection that drains
  answers each request still coming with "Connection: close", and is closed
  only once it has been idle for IDLE_GRACE with nothing left to read.
"""
import argparse
import fcntl
import os
import signal
import socket
import struct
import sys
import termios

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

IDLE_GRACE = 0.25  # seconds of quiet before a draining idle connection is closed
CHECK_EVERY = 0.02
CLOSE_HEADER = (b"connection", b"close")


def sd_notify(state):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)
    return True


def unread_bytes(transport):
    """Bytes the kernel holds for us on the connection that we have not read."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return struct.unpack("i", buf)[0]


class DrainingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a graceful drain (see the module doc)."""

    draining = False
    idle_since = 0.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self.idle_since = self.loop.time()
        if getattr(self.server_state, "draining", False):
            self.shutdown()  # accepted just as the server stopped accepting

    def shutdown(self):
        """Called by uvicorn's Server.shutdown on each connection."""
        self.server_state.draining = True
        if self.draining:
            return
        self.draining = True
        self.idle_since = max(self.idle_since, self.loop.time())
        self._close_after_response()
        self.loop.call_later(CHECK_EVERY, self._close_if_idle)

    def handle_events(self):
        super().handle_events()
        if self.draining:
            self._close_after_response()

    def on_response_complete(self):
        self.idle_since = self.loop.time()
        super().on_response_complete()

    def _close_after_response(self):
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        cycle.keep_alive = False
        if not cycle.response_started and CLOSE_HEADER not in cycle.default_headers:
            # The client learns it from the response, not from a FIN after it.
            cycle.default_headers = cycle.default_headers + [CLOSE_HEADER]

    def _close_if_idle(self):
        if self.transport.is_closing():
            return
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or self.conn.trailing_data[0] or unread_bytes(self.transport):
            self.idle_since = self.loop.time()
        elif self.loop.time() - self.idle_since >= IDLE_GRACE:
            if self.conn.our_state is not h11.ERROR:
                try:
                    self.conn.send(h11.ConnectionClosed())
                except h11.LocalProtocolError:
                    pass
            self.transport.close()
            return
        self.loop.call_later(CHECK_EVERY, self._close_if_idle)


class Server(uvicorn.Server):
    def install_signal_handlers(self):
        # Python's handlers rather than the event loop's, which are removed
        # with the loop: a second stop signal (handoff run's own stop while
        # this one drains) as the loop closes would kill it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if not self.should_exit:
            sd_notify("READY=1")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("app", help="the ASGI app, MODULE:ATTRIBUTE")
    p.add_argument("--app-dir", default=".", help="directory to import the app from first (default: .)")
    p.add_argument("--fd", type=int, default=3, help="listening socket (default 3, from handoff run)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--timeout-keep-alive", type=int, default=5)
    args = p.parse_args()
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        p.error("no socket from handoff (LISTEN_FDS/LISTEN_PID): run me with handoff run")
    sys.path.insert(0, args.app_dir)  # as uvicorn's --app-dir; this script's own directory comes next
    config = uvicorn.Config(
        args.app,
        fd=args.fd,
        http=DrainingH11Protocol,
        lifespan="auto",
        access_log=args.access_log,
        timeout_keep_alive=args.timeout_keep_alive,
    )
    Server(config).run()
    # Served and drained. Python puts the default action back on the signals it
    # handles as it exits (not on ignored ones): a stop signal then would kill
    # it rather than let it exit 0.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
