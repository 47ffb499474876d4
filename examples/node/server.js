'use strict';
// A Node.js server for `handoff run`, with no dependencies beyond Node itself:
//
//   handoff run --listen 127.0.0.1:8080 -- node examples/node/server.js
//
// It serves on the socket handoff passes as fd 3 (LISTEN_FDS), says it is ready
// by writing "READY=1\n" to the descriptor named by HANDOFF_READY_FD, and on
// SIGTERM drains without losing a request: it stops accepting, answers what
// arrives with "Connection: close", closes keep-alive connections only once they
// have been idle for a grace period, and exits when none is left.
const http = require('node:http');
const fs = require('node:fs');

const PID = String(process.pid);
const VERSION = process.env.APP_VERSION || 'dev';
const IDLE_GRACE_MS = 250;
const MAX_SLOW_MS = 60000;

let drainingSince = 0; // 0 while serving
const conns = new Map(); // socket -> { busy, idleSince }

const server = http.createServer((req, res) => {
  res.setHeader('Handoff-Pid', PID);
  res.setHeader('Handoff-Version', VERSION);
  if (drainingSince) res.setHeader('Connection', 'close');
  const url = new URL(req.url, 'http://localhost');
  const send = (status, body) => {
    res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8' });
    res.end(body);
  };
  if (req.method !== 'GET') return send(405, 'method not allowed');
  if (url.pathname === '/') return send(200, 'Hello World !!!');
  if (url.pathname === '/healthz') return send(200, 'ok');
  const hello = url.pathname.match(/^\/hello\/([^/]+)$/);
  if (hello) return send(200, `Hello ${decodeURIComponent(hello[1])}!!!`);
  if (url.pathname === '/slow') {
    const ms = Number(url.searchParams.get('ms'));
    if (!Number.isInteger(ms) || ms < 0 || ms > MAX_SLOW_MS) return send(400, `ms must be an integer from 0 to ${MAX_SLOW_MS}`);
    const timer = setTimeout(() => send(200, `slept ${ms} ms`), ms);
    res.on('close', () => clearTimeout(timer));
    return;
  }
  send(404, 'not found');
});
server.keepAliveTimeout = 120000;
server.headersTimeout = 10000;

server.on('connection', (socket) => {
  conns.set(socket, { busy: false, idleSince: Date.now() });
  socket.on('close', () => conns.delete(socket));
});
server.on('request', (req, res) => {
  const state = conns.get(req.socket);
  if (!state) return;
  state.busy = true;
  res.on('finish', () => { state.busy = false; state.idleSince = Date.now(); });
});

// Node's close() also closes idle keep-alive connections at once, which races
// with a request a client has just sent on one: we close them ourselves, later.
server.closeIdleConnections = () => {};

function drain() {
  if (drainingSince) return;
  drainingSince = Date.now();
  server.close(() => process.exit(0)); // stops accepting; the callback runs once no connection is left
  const idleEnough = (state) => !state.busy && Date.now() - Math.max(state.idleSince, drainingSince) >= IDLE_GRACE_MS;
  const tick = setInterval(() => {
    const idle = [...conns].filter(([, state]) => idleEnough(state));
    if (idle.length === 0) return;
    // Timers run before the event loop reads its sockets: when the process
    // is starved of CPU, a request may already wait in a connection that
    // looks idle here. setImmediate runs after that reading, once the
    // request (if any) has marked its connection busy.
    setImmediate(() => {
      for (const [socket, state] of idle) if (idleEnough(state)) socket.destroy();
    });
  }, 10);
  tick.unref();
}
process.on('SIGTERM', drain);
process.on('SIGINT', drain);

const fds = Number(process.env.LISTEN_FDS || 0);
if (process.env.LISTEN_PID !== PID || fds < 1) {
  console.error('no socket from handoff (LISTEN_FDS/LISTEN_PID): run me with handoff run');
  process.exit(2);
}
server.listen({ fd: 3 }, () => {
  const readyFd = Number(process.env.HANDOFF_READY_FD);
  if (Number.isInteger(readyFd) && readyFd > 0) {
    fs.writeSync(readyFd, 'READY=1\n');
    fs.closeSync(readyFd);
  }
  console.log(`serving on fd 3, version ${VERSION}`);
});
