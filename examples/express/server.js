'use strict';
// An Express app for `handoff run` (README, "Coming from PM2"), in full:
//
//   cd examples/express && npm ci
//   handoff run --listen 127.0.0.1:8080 --pidfile /tmp/app.pid -- node examples/express/server.js
//   handoff upgrade --pidfile /tmp/app.pid
//
// It serves on the socket handoff passes as fd 3 (LISTEN_FDS), says it is ready
// by writing "READY=1\n" to the descriptor named by HANDOFF_READY_FD, and on
// SIGTERM (or SIGINT) drains without losing a request: it stops accepting,
// answers what still arrives with "Connection: close", closes a keep-alive
// connection only once it has been idle for a grace period, and exits 0 when
// none is left.
const http = require('node:http');
const fs = require('node:fs');
const express = require('express');

const PID = String(process.pid);
const VERSION = process.env.APP_VERSION || 'dev';
const IDLE_GRACE_MS = 250;
const MAX_SLOW_MS = 60000;

let drainingSince = 0; // 0 while serving

const app = express();
app.disable('x-powered-by');
// First, so that every route's answer carries it: registered after a route,
// a middleware never runs for the requests that route answers.
app.use((req, res, next) => {
  res.set('Handoff-Pid', PID);
  res.set('Handoff-Version', VERSION);
  if (drainingSince) res.set('Connection', 'close');
  next();
});
app.get('/', (req, res) => res.type('text').send('Hello World !!!'));
app.get('/healthz', (req, res) => res.type('text').send('ok'));
app.get('/hello/:name', (req, res) => res.type('text').send(`Hello ${req.params.name}!!!`));
app.get('/slow', (req, res) => {
  const ms = Number(req.query.ms);
  if (!Number.isInteger(ms) || ms < 0 || ms > MAX_SLOW_MS) {
    return res.status(400).type('text').send(`ms must be an integer from 0 to ${MAX_SLOW_MS}`);
  }
  const timer = setTimeout(() => res.type('text').send(`slept ${ms} ms`), ms);
  res.on('close', () => clearTimeout(timer));
});
app.use((req, res) => res.status(404).type('text').send('not found'));

const server = http.createServer(app);
server.keepAliveTimeout = 120000;
server.headersTimeout = 10000;

// Each connection's state, to close idle keep-alive connections ourselves
// during the drain, after a grace period.
const conns = new Map(); // socket -> { busy, idleSince }
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

const idleEnough = (state) => !state.busy && Date.now() - Math.max(state.idleSince, drainingSince) >= IDLE_GRACE_MS;

function drain() {
  if (drainingSince) return;
  drainingSince = Date.now();
  server.close(() => process.exit(0)); // stops accepting; the callback runs once no connection is left
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

if (process.env.LISTEN_PID !== PID || Number(process.env.LISTEN_FDS || 0) < 1) {
  console.error('no socket from handoff (LISTEN_FDS/LISTEN_PID): run me with handoff run');
  process.exit(2);
}
server.listen({ fd: 3 }, () => {
  const readyFd = Number(process.env.HANDOFF_READY_FD);
  if (Number.isInteger(readyFd) && readyFd > 0) {
    fs.writeSync(readyFd, 'READY=1\n');
    fs.closeSync(readyFd);
  }
  console.log(`express ${require('express/package.json').version} serving on fd 3, version ${VERSION}`);
});
