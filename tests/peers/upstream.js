// A real Node `ws` upstream for the wsgate tests. One process serves several
// behaviours, chosen by the last segment of the request path:
//   /echo...        text -> 'echo: ' + data; binary -> the same bytes back
//   /conformance    exact echo (the Autobahn testsuite's upstream behind the proxy)
//   /subprotocol    chooses 'chat.v2' if offered, else the first offered
//   /close          closes with ?code=&reason= after the first message
//   /headers        first message: JSON of the upgrade request's headers and url
//   /flood          sends ?mib= MiB in 64 KiB binary messages, pacing on ws's buffer
//   /reject         answers the upgrade with 403
//   /drop           destroys the TCP connection after the first message (no close frame)
//   /whoami...      sends 'port:<its port>' when it opens, then echoes (pool tests)
// UPGRADE_STATUS=503 (env) answers every upgrade with that HTTP status instead.
// HOST and PORT (env) choose the listening address (127.0.0.1) and port (any).
// Prints one JSON line per event on stdout: {"listening": port}, {"event": "close", ...}.
// TLS when WSGATE_TLS_CERT and WSGATE_TLS_KEY are set.
'use strict';
const fs = require('fs');
const http = require('http');
const https = require('https');
const { WebSocketServer } = require('ws');

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const certFile = process.env.WSGATE_TLS_CERT;
const server = certFile
  ? https.createServer({ cert: fs.readFileSync(certFile), key: fs.readFileSync(process.env.WSGATE_TLS_KEY) })
  : http.createServer();
server.on('request', (req, res) => { res.writeHead(426); res.end('websocket only\n'); });

const wss = new WebSocketServer({
  noServer: true,
  maxPayload: 64 * 1024 * 1024,
  perMessageDeflate: true,
  handleProtocols: (protocols) => {
    if (protocols.has('chat.v2')) return 'chat.v2';
    for (const p of protocols) return p;
    return false;
  },
});

server.on('upgrade', (req, socket, head) => {
  socket.on('error', (err) => emit({ event: 'socket-error', message: String(err) }));
  const url = new URL(req.url, 'http://upstream');
  if (process.env.UPGRADE_STATUS) {
    emit({ event: 'refused', url: req.url, status: Number(process.env.UPGRADE_STATUS) });
    socket.end(`HTTP/1.1 ${process.env.UPGRADE_STATUS} Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
    return;
  }
  if (url.pathname.endsWith('/reject')) {
    socket.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\nConnection: close\r\n\r\nforbidden\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => serve(ws, req, url));
});

function serve(ws, req, url) {
  const path = '/' + url.pathname.split('/').pop();
  emit({ event: 'open', path, url: req.url, protocol: ws.protocol });
  ws.on('close', (code, reason) => emit({ event: 'close', path, code, reason: reason.toString() }));
  ws.on('error', (err) => emit({ event: 'error', path, message: String(err) }));
  if (path === '/headers') {
    ws.send(JSON.stringify({ url: req.url, headers: req.headers }));
  } else if (url.pathname.includes('/whoami')) {
    ws.send('port:' + server.address().port);
  } else if (path === '/flood') {
    const total = Number(url.searchParams.get('mib') || '1') * 1024 * 1024;
    const chunk = Buffer.alloc(64 * 1024, 0x61);
    let sent = 0;
    const pump = () => {
      while (sent < total && ws.readyState === ws.OPEN) {
        if (ws.bufferedAmount > 1024 * 1024) { setTimeout(pump, 5); return; }
        ws.send(chunk, { binary: true });
        sent += chunk.length;
      }
      if (sent >= total) { emit({ event: 'flood-done', path, sent }); ws.send('done'); }
    };
    pump();
  }
  ws.on('message', (data, isBinary) => {
    if (path === '/close') {
      ws.close(Number(url.searchParams.get('code') || '1000'), url.searchParams.get('reason') || '');
    } else if (path === '/conformance') {
      ws.send(data, { binary: isBinary });
    } else if (path === '/drop') {
      ws._socket.destroy();
    } else if (isBinary) {
      ws.send(data, { binary: true });
    } else {
      ws.send('echo: ' + data.toString());
    }
  });
}

server.listen(Number(process.env.PORT || 0), process.env.HOST || '127.0.0.1', () => emit({ listening: server.address().port }));
process.on('SIGTERM', () => process.exit(0));
