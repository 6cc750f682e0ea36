// Node `ws` peers for the benchmark: an exact echo (also the proxy scenario's
// upstream) or a broadcast server (every message to every other client, the ws
// README's broadcast loop). perMessageDeflate off; bufferutil and
// utf-8-validate are used when installed (bench/package.json).
//   node node_ws.js echo|broadcast [--ping SECONDS]
// Prints {"listening": PORT} for 127.0.0.1, port 0.
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const mode = process.argv[2] || 'echo';
const pingAt = process.argv.indexOf('--ping');
const ping = pingAt > 0 ? Number(process.argv[pingAt + 1]) : 0;
const wss = new WebSocketServer({
  host: '127.0.0.1', port: 0, backlog: 4096, perMessageDeflate: false,
  maxPayload: 64 * 1024 * 1024, clientTracking: true,
});

wss.on('connection', (ws) => {
  ws.on('error', () => {});
  if (mode === 'broadcast') {
    ws.on('message', (data, isBinary) => {
      for (const client of wss.clients) {
        if (client !== ws && client.readyState === WebSocket.OPEN) client.send(data, { binary: isBinary });
      }
    });
  } else {
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  }
  if (ping) {
    ws.isAlive = true;
    ws.on('pong', () => { ws.isAlive = true; });
  }
});

if (ping) {
  // The ws README's keepalive: ping every interval, drop whoever missed the last one.
  setInterval(() => {
    for (const ws of wss.clients) {
      if (!ws.isAlive) { ws.terminate(); continue; }
      ws.isAlive = false;
      ws.ping();
    }
  }, ping * 1000);
}

wss.on('listening', () => process.stdout.write(JSON.stringify({ listening: wss.address().port }) + '\n'));
process.on('SIGTERM', () => process.exit(0));
