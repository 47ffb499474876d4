'use strict';
// The classic Express app under PM2 (README, "Coming from PM2"), for
// BenchmarkClusterVsPM2: PM2's graceful-stop recipe (server.close on SIGINT),
// the address from HOST and PORT (IPv4 loopback, where the load goes), and
// the routes and headers of the handoff examples (Handoff-Pid, /healthz,
// /slow?ms=N), so that the same load measures both. Without Express
// installed (NODE_PATH), the same app on node:http.
const PID = String(process.pid);
const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || '127.0.0.1';
const slow = (ms, done) => setTimeout(done, ms);

let server;
try {
  const express = require('express');
  const app = express();
  app.disable('x-powered-by');
  app.use((req, res, next) => { res.set('Handoff-Pid', PID); next(); });
  app.get('/', (req, res) => res.type('text').send('Hello World !!!'));
  app.get('/healthz', (req, res) => res.type('text').send('ok'));
  app.get('/slow', (req, res) => {
    const ms = Number(req.query.ms);
    slow(ms, () => res.type('text').send(`slept ${ms} ms`));
  });
  server = app.listen(port, host);
} catch (e) {
  if (e.code !== 'MODULE_NOT_FOUND') throw e;
  const http = require('node:http');
  server = http.createServer((req, res) => {
    res.setHeader('Handoff-Pid', PID);
    const url = new URL(req.url, 'http://localhost');
    const send = (body) => { res.writeHead(200, { 'Content-Type': 'text/plain' }); res.end(body); };
    if (url.pathname === '/slow') {
      const ms = Number(url.searchParams.get('ms'));
      return slow(ms, () => send(`slept ${ms} ms`));
    }
    send(url.pathname === '/healthz' ? 'ok' : 'Hello World !!!');
  }).listen(port, host);
}
process.on('SIGINT', () => server.close(() => process.exit(0)));
