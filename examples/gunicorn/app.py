"""A WSGI app for gunicorn under `handoff run` (see README.md beside it).

Routes, as in the other examples: GET / ("Hello World !!!"), /healthz ("ok"),
/hello/NAME and /slow?ms=N. Each answer names in Handoff-Pid the gunicorn
master, the process handoff started and replaces on an upgrade, and in
Handoff-Worker the worker that answered.
"""
import os
import time
from urllib.parse import parse_qs, unquote

VERSION = os.environ.get("APP_VERSION", "dev")
MAX_SLOW_MS = 60000


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    status, body = "404 Not Found", "not found"
    if environ["REQUEST_METHOD"] != "GET":
        status, body = "405 Method Not Allowed", "method not allowed"
    elif path == "/":
        status, body = "200 OK", "Hello World !!!"
    elif path == "/healthz":
        status, body = "200 OK", "ok"
    elif path.startswith("/hello/") and len(path) > len("/hello/"):
        status, body = "200 OK", "Hello %s!!!" % unquote(path[len("/hello/"):])
    elif path == "/slow":
        try:
            ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", [""])[0])
        except ValueError:
            ms = -1
        if 0 <= ms <= MAX_SLOW_MS:
            time.sleep(ms / 1000)
            status, body = "200 OK", "slept %d ms" % ms
        else:
            status, body = "400 Bad Request", "ms must be an integer from 0 to %d" % MAX_SLOW_MS
    data = body.encode()
    start_response(status, [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(data))),
        # A worker's parent is the master (the arbiter), the child of handoff run.
        ("Handoff-Pid", str(os.getppid())),
        ("Handoff-Worker", str(os.getpid())),
        ("Handoff-Version", VERSION),
    ])
    return [data]
