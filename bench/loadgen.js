// The benchmark load generator (Node.js, npm `ws` with bufferutil/utf-8-validate).
//
//   node loadgen.js '<JSON options>'
//
// Modes (options.mode):
//   rr         N connections each doing request/response round trips of S bytes
//              (closed loop: the next message leaves when the reply arrived). By default
//              the client is a raw socket writing one pre-built masked frame per message
//              and parsing the replies' frame headers (options.client = 'ws' uses `ws`
//              clients instead, ~2x the generator CPU per message).
//   fanout     SUBS raw-socket subscribers and one `ws` publisher that sends M binary
//              messages at R messages/s; the payload carries the send time, so each
//              delivery gives an end-to-end latency.
//   handshake  C concurrent loops of: connect, upgrade, 101, close frame, wait for
//              the server to close, repeat.
//   idle       N `ws` connections (they answer pings), then hold until stdin says
//              "close" (or hold_max seconds), then close.
//   recover    N `ws` clients of the wsgate.v1.json subprotocol note their position and
//              leave; one publisher sends M messages; then all N reconnect at once with
//              ?since=<their position>: the time and server CPU until every client has
//              recovered all M (a broadcast route with history >= M).
//
// The generator reads the server's CPU time (utime + stime from /proc/PID/stat of
// options.server_pids, and options.other_pids separately) itself, at the exact start
// and end of the measurement window, and its own CPU time (process.cpuUsage()).
// It prints JSON lines; the last one is {"result": {...}}. Every loop is bounded by
// a count or a deadline.
'use strict';
const fs = require('fs');
const net = require('net');
const { performance } = require('perf_hooks');
const WebSocket = require('ws');

const opts = JSON.parse(process.argv[2] || '{}');
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const TICK = opts.clk_tck || 100;

// ------------------------------------------------------------------ measurement

function cpuOf(pids) {
  let ticks = 0;
  for (const pid of pids || []) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks += Number(fields[11]) + Number(fields[12]);  // utime, stime
    } catch (e) { /* gone */ }
  }
  return ticks / TICK;  // seconds
}

// CPU time of the whole machine (all cores), seconds: processes (user nice system), and
// interrupts (irq softirq: loopback packet processing is partly here, charged to no process).
function machineBusy() {
  try {
    const f = fs.readFileSync('/proc/stat', 'latin1').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    return { procs: (f[0] + f[1] + f[2]) / TICK, irq: (f[5] + f[6]) / TICK, steal: f[7] / TICK };
  } catch (e) { return { procs: 0, irq: 0, steal: 0 }; }
}

function snapshot() {
  const own = process.cpuUsage();
  return {
    busy: machineBusy(),
    t: performance.now(),
    server: cpuOf(opts.server_pids),
    other: cpuOf(opts.other_pids),
    gen: (own.user + own.system) / 1e6,
  };
}

function window(a, b) {
  const wall = (b.t - a.t) / 1000;
  return {
    seconds: wall,
    server_cpu_s: b.server - a.server,
    other_cpu_s: b.other - a.other,
    gen_cpu_s: b.gen - a.gen,
    server_util: wall > 0 ? (b.server - a.server) / wall : 0,
    other_util: wall > 0 ? (b.other - a.other) / wall : 0,
    gen_util: wall > 0 ? (b.gen - a.gen) / wall : 0,
    // everything else that ran on the machine meanwhile (other people's work), in cores
    foreign_util: wall > 0 ? Math.max(0, (b.busy.procs - a.busy.procs) - (b.server - a.server)
      - (b.other - a.other) - (b.gen - a.gen)) / wall : 0,
    irq_util: wall > 0 ? (b.busy.irq - a.busy.irq) / wall : 0,
    steal_util: wall > 0 ? (b.busy.steal - a.busy.steal) / wall : 0,
  };
}

// Log-bucketed latency histogram (1 % resolution) in microseconds.
class Histogram {
  constructor() { this.counts = new Float64Array(2400); this.n = 0; this.max = 0; }
  add(us) {
    if (us < 1) us = 1;
    let i = Math.floor(Math.log(us) * 100);
    if (i >= this.counts.length) i = this.counts.length - 1;
    this.counts[i]++; this.n++;
    if (us > this.max) this.max = us;
  }
  pct(p) {
    if (!this.n) return null;
    const want = this.n * p / 100;
    let seen = 0;
    for (let i = 0; i < this.counts.length; i++) {
      seen += this.counts[i];
      if (seen >= want) return Math.min(Math.exp((i + 0.5) / 100), this.max);
    }
    return this.max;
  }
  summary() {
    return { samples: this.n, p50_us: this.pct(50), p90_us: this.pct(90),
             p99_us: this.pct(99), max_us: this.n ? this.max : null };
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Run fn(i) for i in [0, n) with at most `limit` in flight.
async function pool(n, limit, fn) {
  let next = 0;
  const worker = async () => { while (next < n) { const i = next++; await fn(i); } };
  await Promise.all(Array.from({ length: Math.min(n, limit) }, worker));
}

function openWs(url, i, headers) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, {
      perMessageDeflate: false, maxPayload: 256 * 1024 * 1024, headers,
      handshakeTimeout: 20000,
      localAddress: opts.local_addresses ? opts.local_addresses[i % opts.local_addresses.length] : undefined,
    });
    ws.binaryType = 'nodebuffer';
    const fail = (err) => reject(err);
    ws.once('error', fail);
    ws.once('unexpected-response', (req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
    ws.once('open', () => { ws.removeListener('error', fail); ws.on('error', () => {}); resolve(ws); });
  });
}

// ------------------------------------------------------------------ rr

async function rr() {
  if (opts.client !== 'ws') return rrRaw();
  const n = opts.connections, size = opts.size;
  const payload = Buffer.alloc(size, 0x61);  // 'aaaa…', valid UTF-8
  const binary = !!opts.binary;
  const conns = new Array(n);
  await pool(n, 200, async (i) => { conns[i] = await openWs(opts.url, i, opts.headers); });
  let count = 0, bad = 0, running = true, measuring = false;
  let hist = new Histogram();
  for (const ws of conns) {
    let sent = 0;
    ws.on('message', (data) => {
      const now = performance.now();
      if (data.length !== size) bad++;
      count++;
      if (measuring) hist.add((now - sent) * 1000);
      if (running) { sent = performance.now(); ws.send(payload, { binary }); }
    });
    ws.on('close', () => { if (running) bad++; });
    sent = performance.now();
    ws.send(payload, { binary });
  }
  await sleep(opts.warmup * 1000);
  const c0 = count; const a = snapshot(); measuring = true; hist = new Histogram();
  await sleep(opts.duration * 1000);
  const b = snapshot(); const c1 = count; measuring = false; running = false;
  for (const ws of conns) ws.terminate();
  const w = window(a, b);
  return { client: 'ws', messages: c1 - c0, msgs_per_s: (c1 - c0) / w.seconds, bad, ...w,
           latency: hist.summary() };
}

// ------------------------------------------------------------------ fanout

const WARM = 0xffffffff;

// A raw-socket WebSocket client: HTTP upgrade, then a minimal frame parser (servers do
// not mask). onFrame(buf, offset, length, fin) gets each data frame; pings are answered.
// Much cheaper per message than a `ws` client, so the generator stays off the critical path.
function rawConnect(url, i, onFrame, headers) {
  const u = new URL(url);
  let extra = '';
  for (const [k, v] of Object.entries(headers || {})) extra += `${k}: ${v}\r\n`;
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host: u.hostname, port: Number(u.port),
      localAddress: opts.local_addresses ? opts.local_addresses[i % opts.local_addresses.length] : undefined });
    sock.setNoDelay(true);
    let head = Buffer.alloc(0), open = false, pending = null;
    const timer = setTimeout(() => { sock.destroy(); reject(new Error('handshake timeout')); }, 30000);
    sock.on('error', (err) => { if (!open) { clearTimeout(timer); reject(err); } });
    sock.on('connect', () => sock.write(
      `GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n${extra}\r\n`));
    const frames = (chunk) => {
      const buf = pending ? Buffer.concat([pending, chunk]) : chunk;
      let off = 0;
      const len = buf.length;
      while (len - off >= 2) {
        const b0 = buf[off], b1 = buf[off + 1] & 0x7f;
        let hdr = 2, plen = b1;
        if (b1 === 126) { if (len - off < 4) break; plen = buf.readUInt16BE(off + 2); hdr = 4; }
        else if (b1 === 127) { if (len - off < 10) break; plen = buf.readUInt32BE(off + 6); hdr = 10; }
        if (buf[off + 1] & 0x80) hdr += 4;  // servers do not mask
        if (len - off < hdr + plen) break;
        const op = b0 & 0x0f;
        if (op <= 2) onFrame(buf, off + hdr, plen, (b0 & 0x80) !== 0);
        else if (op === 9) {  // ping -> pong (masked with a zero key)
          const p = buf.subarray(off + hdr, off + hdr + plen);
          sock.write(Buffer.concat([Buffer.from([0x8a, 0x80 | p.length, 0, 0, 0, 0]), p]));
        }
        off += hdr + plen;
      }
      pending = off < len ? buf.subarray(off) : null;
    };
    sock.on('data', (chunk) => {
      if (open) return frames(chunk);
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      clearTimeout(timer);
      if (!head.subarray(0, 12).toString().startsWith('HTTP/1.1 101')) {
        sock.destroy(); reject(new Error('refused: ' + head.subarray(0, 40).toString())); return;
      }
      open = true; resolve(sock);
      if (head.length > end + 4) frames(head.subarray(end + 4));
    });
  });
}

// One client frame (FIN, masked with a fixed key), built once and written for every message.
function maskedFrame(payload, opcode) {
  const n = payload.length;
  const head = n < 126 ? Buffer.from([0x80 | opcode, 0x80 | n])
    : n < 65536 ? Buffer.from([0x80 | opcode, 0x80 | 126, n >> 8, n & 0xff])
      : (() => { const b = Buffer.alloc(10); b[0] = 0x80 | opcode; b[1] = 0x80 | 127; b.writeUInt32BE(n, 6); return b; })();
  const key = Buffer.from([0x37, 0xfa, 0x21, 0x3d]);
  const body = Buffer.alloc(n);
  for (let i = 0; i < n; i++) body[i] = payload[i] ^ key[i & 3];
  return Buffer.concat([head, key, body]);
}

async function rrRaw() {
  const n = opts.connections, size = opts.size;
  const frame = maskedFrame(Buffer.alloc(size, 0x61), opts.binary ? 2 : 1);
  const socks = new Array(n), sent = new Float64Array(n), acc = new Float64Array(n);
  let count = 0, bad = 0, running = true, measuring = false;
  let hist = new Histogram();
  await pool(n, 200, async (i) => {
    socks[i] = await rawConnect(opts.url, i, (buf, off, plen, fin) => {
      acc[i] += plen;
      if (!fin) return;
      const now = performance.now();
      if (acc[i] !== size) bad++;
      acc[i] = 0;
      count++;
      if (measuring) hist.add((now - sent[i]) * 1000);
      if (running) { sent[i] = now; socks[i].write(frame); }
    }, opts.headers);
    socks[i].on('close', () => { if (running) bad++; });
  });
  for (let i = 0; i < n; i++) { sent[i] = performance.now(); socks[i].write(frame); }
  await sleep(opts.warmup * 1000);
  const c0 = count; const a = snapshot(); measuring = true; hist = new Histogram();
  await sleep(opts.duration * 1000);
  const b = snapshot(); const c1 = count; measuring = false; running = false;
  for (const s of socks) s.destroy();
  const w = window(a, b);
  return { client: 'raw', messages: c1 - c0, msgs_per_s: (c1 - c0) / w.seconds, bad, ...w,
           latency: hist.summary() };
}

async function fanout() {
  const subs = opts.subscribers, m = opts.messages, rate = opts.rate, size = Math.max(opts.size || 64, 16);
  const got = new Uint32Array(subs), warm = new Uint8Array(subs);
  let delivered = 0, lastDelivery = 0, dupes = 0;
  const hist = new Histogram();
  const socks = new Array(subs);
  await pool(subs, 100, async (i) => {
    socks[i] = await rawConnect(opts.url, i, (buf, off, len) => {
      const now = performance.now();
      const seq = buf.readUInt32LE(off);
      if (seq === WARM) { warm[i] = 1; return; }
      const ts = buf.readDoubleLE(off + 8);
      hist.add((now - ts) * 1000);
      got[i]++; delivered++; lastDelivery = now;
      if (got[i] > m) dupes++;
    });
  });
  const pub = await openWs(opts.url, subs, opts.headers);
  emit({ event: 'connected', subscribers: subs });
  const msg = (seq) => {
    const b = Buffer.alloc(size, 0x20);
    b.writeUInt32LE(seq, 0); b.writeDoubleLE(performance.now(), 8);
    return b;
  };
  // Warm-up: publish until every subscriber has one message (subscriptions are live).
  const warmDeadline = performance.now() + 30000;
  let warmed = 0;
  while (performance.now() < warmDeadline) {
    pub.send(msg(WARM), { binary: true });
    await sleep(100);
    warmed = warm.reduce((s, x) => s + x, 0);
    if (warmed === subs) break;
  }
  await sleep(300);
  const a = snapshot();
  let sent = 0;
  const started = performance.now();
  // burst > 1: the publisher sends `burst` messages back to back (one TCP write, corked)
  // every burst/rate seconds, as a ticker or a batch job does; the mean rate stays `rate`.
  const burst = Math.max(1, opts.burst || 1);
  await new Promise((resolve) => {
    const tick = () => {
      const bursts = Math.floor((performance.now() - started) * rate / 1000 / burst) + 1;
      const due = Math.min(m, bursts * burst);
      if (sent < due) {
        pub._socket.cork();
        while (sent < due) pub.send(msg(sent++), { binary: true });
        pub._socket.uncork();
      }
      if (sent < m) setTimeout(tick, 1); else resolve();
    };
    tick();
  });
  const want = m * subs, deadline = performance.now() + (opts.drain_timeout || 20) * 1000;
  while (delivered < want && performance.now() < deadline) await sleep(5);
  const b = snapshot();
  const w = window(a, b);
  const span = ((lastDelivery || b.t) - started) / 1000;
  pub.terminate();
  for (const s of socks) s.destroy();
  return { subscribers: subs, warmed, published: sent, delivered, expected: want, dupes,
           missing: want - delivered, deliveries_per_s: delivered / span, delivery_span_s: span,
           ...w, latency: hist.summary() };
}

// ------------------------------------------------------------------ handshake

async function handshake() {
  const u = new URL(opts.url);
  let extra = '';
  for (const [k, v] of Object.entries(opts.headers || {})) extra += `${k}: ${v}\r\n`;
  const request = Buffer.from(
    `GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\n` +
    'Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n' +
    `Sec-WebSocket-Version: 13\r\n${extra}\r\n`);
  const close = Buffer.from([0x88, 0x82, 0x11, 0x22, 0x33, 0x44, 0x03 ^ 0x11, 0xe8 ^ 0x22]);
  let ok = 0, refused = 0, errors = 0, timeouts = 0, measuring = false, running = true;
  let hist = new Histogram();
  const addrs = opts.local_addresses;
  let k = 0;
  const one = () => new Promise((resolve) => {
    const t0 = performance.now();
    const sock = net.connect({ host: u.hostname, port: Number(u.port),
      localAddress: addrs ? addrs[k++ % addrs.length] : undefined });
    sock.setNoDelay(true);
    let head = '', upgraded = false, done = false;
    const finish = (kind) => {
      if (done) return; done = true; clearTimeout(timer);
      if (kind === 'ok') ok++; else if (kind === 'refused') refused++;
      else if (kind === 'timeout') timeouts++; else errors++;
      sock.destroy(); resolve();
    };
    const timer = setTimeout(() => finish('timeout'), 10000);
    sock.on('error', () => finish(upgraded ? 'ok' : 'error'));
    sock.on('close', () => finish(upgraded ? 'ok' : 'error'));
    sock.on('connect', () => sock.write(request));
    sock.on('data', (chunk) => {
      if (upgraded) return;  // the server's close frame; it closes the TCP connection next
      head += chunk.toString('latin1');
      if (head.indexOf('\r\n\r\n') < 0) return;
      if (!head.startsWith('HTTP/1.1 101')) { finish('refused'); return; }
      upgraded = true;
      if (measuring) hist.add((performance.now() - t0) * 1000);
      sock.write(close);
    });
  });
  const loops = [];
  for (let c = 0; c < opts.concurrency; c++) {
    loops.push((async () => { while (running) await one(); })());
  }
  await sleep(opts.warmup * 1000);
  const o0 = ok, r0 = refused, e0 = errors;
  const a = snapshot(); measuring = true; hist = new Histogram();
  await sleep(opts.duration * 1000);
  const b = snapshot(); measuring = false; running = false;
  const n = ok - o0;
  await Promise.race([Promise.all(loops), sleep(12000)]);
  const w = window(a, b);
  return { handshakes: n, handshakes_per_s: n / w.seconds, refused: refused - r0,
           errors: errors - e0, timeouts, ...w, latency: hist.summary() };
}

// ------------------------------------------------------------------ idle

async function idle() {
  const n = opts.connections;
  const conns = [];
  let closed = 0, failed = 0, pings = 0;
  const t0 = performance.now();
  await pool(n, opts.concurrency || 200, async (i) => {
    try {
      const ws = await openWs(opts.url, i, opts.headers);
      ws.on('close', () => closed++);
      ws.on('ping', () => pings++);
      conns.push(ws);
    } catch (e) {
      failed++;
      if (failed <= 3) emit({ event: 'open-failed', message: String(e) });
    }
  });
  emit({ event: 'opened', connections: conns.length, failed, seconds: (performance.now() - t0) / 1000 });
  // Hold until the runner writes "close" (or hold_max seconds).
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, (opts.hold_max || 300) * 1000);
    let buf = '';
    process.stdin.on('data', (d) => { buf += d; if (buf.includes('close')) { clearTimeout(timer); resolve(); } });
    process.stdin.on('end', () => { clearTimeout(timer); resolve(); });
  });
  const stillOpen = conns.length - closed;
  for (const ws of conns) ws.terminate();
  return { connections: conns.length, failed, closed_by_server: closed, still_open: stillOpen, pings };
}

// ------------------------------------------------------------------ recover

function openJson(url, i, onMessage) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, ['wsgate.v1.json'], { perMessageDeflate: false,
                                                          handshakeTimeout: 30000 });
    ws.once('error', reject);
    ws.once('unexpected-response', (req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
    ws.on('message', (data) => onMessage(JSON.parse(data.toString())));
    ws.once('open', () => { ws.removeListener('error', reject); ws.on('error', () => {}); resolve(ws); });
  });
}

async function recover() {
  const n = opts.clients, m = opts.messages;
  const since = new Array(n);
  const first = new Array(n);
  await pool(n, 100, async (i) => {
    await new Promise((resolve, reject) => {
      openJson(opts.url, i, (msg) => {
        if (msg.type === 'subscribed') { since[i] = msg.pos; resolve(); }
      }).then((ws) => { first[i] = ws; }, reject);
    });
  });
  for (const ws of first) ws.terminate();
  await sleep(500);
  const pub = await openWs(opts.url, n, opts.headers);
  for (let k = 0; k < m; k++) pub.send(`missed ${k}`);
  // the publisher's last message is recorded once a fresh client's position covers it
  const deadline = performance.now() + 30000;
  let recorded = false;
  while (!recorded && performance.now() < deadline) {
    await new Promise((resolve) => {
      let probe = null, finished = false;
      const finish = () => {
        if (finished) return;
        finished = true;
        clearTimeout(guard);
        if (probe) probe.terminate();
        resolve();
      };
      const guard = setTimeout(finish, 5000);  // the answer may wait behind the publishes
      openJson(opts.url, n + 1, (msg) => {
        if (msg.type === 'subscribed') {
          const [, seq] = msg.pos.split(':');
          recorded = Number(seq) >= Number(since[0].split(':')[1]) + m;
          finish();
        }
      }).then((ws) => { probe = ws; if (finished) ws.terminate(); }, finish);
    });
    if (!recorded) await sleep(50);
  }
  const got = new Uint32Array(n);
  let complete = 0, failed = 0, recoveredAll = 0, dupes = 0;
  let done;
  const allDone = new Promise((resolve) => { done = resolve; });
  const a = snapshot();
  const conns = new Array(n);
  await Promise.all(Array.from({ length: n }, (_, i) => openJson(
    `${opts.url}?since=${encodeURIComponent(since[i])}`, i, (msg) => {
      if (msg.type === 'recovery_failed') { failed++; complete++; if (complete === n) done(); return; }
      if (msg.type || msg.data === undefined) return;
      got[i]++;
      if (got[i] === m) { recoveredAll++; complete++; if (complete === n) done(); }
      if (got[i] > m) dupes++;
    }).then((ws) => { conns[i] = ws; }, () => { failed++; complete++; if (complete === n) done(); })));
  const timeout = new Promise((resolve) => setTimeout(resolve, (opts.timeout || 120) * 1000));
  await Promise.race([allDone, timeout]);
  const b = snapshot();
  const w = window(a, b);
  for (const ws of conns) if (ws) ws.terminate();
  pub.terminate();
  let delivered = 0;
  for (const x of got) delivered += x;
  return { clients: n, messages: m, recorded, recovered_all: recoveredAll, failed, dupes,
           delivered, ...w };
}

// ------------------------------------------------------------------ main

const modes = { rr, fanout, handshake, idle, recover };
const deadline = setTimeout(() => { emit({ error: 'generator deadline reached' }); process.exit(3); },
  (opts.max_seconds || 600) * 1000);
modes[opts.mode]().then((result) => {
  emit({ result });
  clearTimeout(deadline);
  setTimeout(() => process.exit(0), 100);
}).catch((err) => {
  emit({ error: String(err && err.stack || err) });
  process.exit(2);
});
