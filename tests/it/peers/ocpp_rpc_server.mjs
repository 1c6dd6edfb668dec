#!/usr/bin/env node
// An OCPP 1.6-J central system built on the npm package `ocpp-rpc` (RPCServer, strict mode),
// standing in for SteVe.
//
// Usage: node ocpp_rpc_server.mjs [--host H] [--port P] [--path-prefix PREFIX] [--log FILE]
//          [--initiate-calls] [--first-transaction-id N] [--password P]
// Accepts {path_prefix}/{chargeBoxId} only (else 404), negotiates ocpp1.6, accepts every boot and
// id tag, assigns increasing transaction ids; with --initiate-calls it sends RemoteStartTransaction,
// Reset and GetConfiguration after each BootNotification and checks the replies. The first stdout
// line is {"event":"listening","port":N}; events follow as JSON lines in --log (default stdout).
import { RPCServer } from 'ocpp-rpc';
import { parseArgs } from 'node:util';
import fs from 'node:fs';

const { values: args } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    'path-prefix': { type: 'string', default: '/steve/websocket/CentralSystemService' },
    log: { type: 'string' },
    'initiate-calls': { type: 'boolean', default: false },
    'first-transaction-id': { type: 'string', default: '1' },
    password: { type: 'string' },
  },
});
const logFd = args.log ? fs.openSync(args.log, 'a') : 1;
const log = (event, fields) => fs.writeSync(logFd, JSON.stringify({ event, ...fields }) + '\n');
const nowIso = () => new Date().toISOString();
let nextTransactionId = Number(args['first-transaction-id']);
const prefix = args['path-prefix'].replace(/\/+$/, '');

const server = new RPCServer({ protocols: ['ocpp1.6'], strictMode: true, callTimeoutMs: 20000 });

server.auth((accept, reject, handshake) => {
  if (handshake.endpoint !== prefix || handshake.identity === '') return reject(404, 'Not Found');
  if (args.password !== undefined && handshake.password?.toString('utf8') !== args.password) {
    return reject(401, 'Unauthorized');
  }
  accept({ authorization: handshake.headers.authorization ?? null, offered: handshake.headers['sec-websocket-protocol'] ?? null });
});

server.on('client', (client) => {
  const id = client.identity;
  log('connected', { charge_box_id: id, subprotocol: client.protocol, offered: client.session.offered, authorization: client.session.authorization });
  const got = (action, payload) => log('call_received', { charge_box_id: id, action, payload });

  const initiateCalls = async () => {
    const checks = [
      ['RemoteStartTransaction', { idTag: 'TAG-REMOTE', connectorId: 1 }, (r) => r.status === 'Accepted'],
      ['Reset', { type: 'Soft' }, (r) => r.status === 'Accepted'],
      ['GetConfiguration', { key: ['HeartbeatInterval'] }, (r) => (r.configurationKey ?? []).some((k) => k.key === 'HeartbeatInterval')],
    ];
    for (const [action, params, check] of checks) {
      try {
        const response = await client.call(action, params);
        log('central_call_result', { charge_box_id: id, action, ok: Boolean(check(response)), response });
      } catch (err) {
        log('central_call_result', { charge_box_id: id, action, ok: false, error: String(err) });
      }
    }
  };

  client.handle('BootNotification', ({ params }) => {
    got('BootNotification', params);
    // Only after our CALLRESULT is on its way: the charger is then free to answer our calls.
    if (args['initiate-calls']) setImmediate(initiateCalls);
    return { status: 'Accepted', currentTime: nowIso(), interval: 300 };
  });
  client.handle('Heartbeat', ({ params }) => { got('Heartbeat', params); return { currentTime: nowIso() }; });
  client.handle('StartTransaction', ({ params }) => {
    const transactionId = nextTransactionId++;
    got('StartTransaction', { ...params, transactionId });
    return { transactionId, idTagInfo: { status: 'Accepted' } };
  });
  client.handle('MeterValues', ({ params }) => { got('MeterValues', params); return {}; });
  client.handle('StopTransaction', ({ params }) => { got('StopTransaction', params); return { idTagInfo: { status: 'Accepted' } }; });
  client.on('close', ({ code }) => log('disconnected', { charge_box_id: id, code }));
});

const httpServer = await server.listen(Number(args.port), args.host);
process.stdout.write(JSON.stringify({ event: 'listening', port: httpServer.address().port }) + '\n');
const stop = async () => {
  await server.close({ force: true }).catch(() => {});
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
