"""An ASGI app for uvicorn under `handoff run` (see README.md beside it).

A plain ASGI app: serve.py runs it under uvicorn on handoff's socket, says when
it is ready and drains without losing a request.

Routes, as in the other examples: GET / ("Hello World !!!"), /healthz ("ok"),
/hello/NAME and /slow?ms=N; Handoff-Pid names the process that answered.
"""
import asyncio
import os
from urllib.parse import parse_qs, unquote

VERSION = os.environ.get("APP_VERSION", "dev")
MAX_SLOW_MS = 60000
PID = str(os.getpid()).encode()


async def lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] != "http":
        return
    path = scope["path"]
    status, body = 404, "not found"
    if scope["method"] != "GET":
        status, body = 405, "method not allowed"
    elif path == "/":
        status, body = 200, "Hello World !!!"
    elif path == "/healthz":
        status, body = 200, "ok"
    elif path.startswith("/hello/") and len(path) > len("/hello/"):
        status, body = 200, "Hello %s!!!" % unquote(path[len("/hello/"):])
    elif path == "/slow":
        try:
            ms = int(parse_qs(scope["query_string"].decode()).get("ms", [""])[0])
        except ValueError:
            ms = -1
        if 0 <= ms <= MAX_SLOW_MS:
            await asyncio.sleep(ms / 1000)
            status, body = 200, "slept %d ms" % ms
        else:
            status, body = 400, "ms must be an integer from 0 to %d" % MAX_SLOW_MS
    data = body.encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(data)).encode()),
            (b"handoff-pid", PID),
            (b"handoff-version", VERSION.encode()),
        ],
    })
    await send({"type": "http.response.body", "body": data})
