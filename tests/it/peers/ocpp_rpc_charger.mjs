#!/usr/bin/env node
// An OCPP 1.6-J charge point built on the npm package `ocpp-rpc` in strict mode (every payload,
// sent or received, is validated against the ocpp1.6 schemas).
//
// Usage: node ocpp_rpc_charger.mjs --url BASE --id CHARGE_BOX_ID [--sessions N] [--meter-values N]
//          [--expect-central-calls] [--password P] [--timeout SECONDS]
// Does BootNotification, Heartbeat, then N sessions (StartTransaction, MeterValues in Wh and kWh,
// StopTransaction), answers RemoteStartTransaction, Reset and GetConfiguration, prints one JSON
// line summary on stdout and exits 0 only if the whole flow completed.
import { RPCClient } from 'ocpp-rpc';
import { parseArgs } from 'node:util';

const CENTRAL_CALLS = ['RemoteStartTransaction', 'Reset', 'GetConfiguration'];

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    id: { type: 'string' },
    sessions: { type: 'string', default: '1' },
    'meter-values': { type: 'string', default: '3' },
    'expect-central-calls': { type: 'boolean', default: false },
    password: { type: 'string' },
    'id-tag': { type: 'string', default: 'TAG-IT-1' },
    timeout: { type: 'string', default: '30' },
  },
});
if (!args.url || !args.id) {
  console.error('usage: ocpp_rpc_charger.mjs --url BASE --id CHARGE_BOX_ID [...]');
  process.exit(2);
}
const timeoutMs = Number(args.timeout) * 1000;
const nowIso = () => new Date().toISOString();

const summary = { charge_box_id: args.id, ok: false, sent: {}, received_calls: {}, transaction_ids: [], meter_wh: [] };
let resolveCentralCalls;
const centralCallsSeen = new Promise((resolve) => { resolveCentralCalls = resolve; });
const saw = (method) => {
  summary.received_calls[method] = (summary.received_calls[method] ?? 0) + 1;
  if (CENTRAL_CALLS.every((m) => m in summary.received_calls)) resolveCentralCalls();
};

const client = new RPCClient({
  endpoint: args.url.replace(/\/+$/, ''),
  identity: args.id,
  protocols: ['ocpp1.6'],
  strictMode: true,
  reconnect: false,
  callTimeoutMs: timeoutMs,
  ...(args.password !== undefined ? { password: args.password } : {}),
});
client.on('strictValidationFailure', ({ error }) => {
  summary.validation_failures = (summary.validation_failures ?? 0) + 1;
  summary.last_validation_failure = String(error);
});

client.handle('RemoteStartTransaction', () => { saw('RemoteStartTransaction'); return { status: 'Accepted' }; });
client.handle('Reset', () => { saw('Reset'); return { status: 'Accepted' }; });
client.handle('GetConfiguration', ({ params }) => {
  saw('GetConfiguration');
  const known = { HeartbeatInterval: '300', MeterValueSampleInterval: '60' };
  const wanted = params.key?.length ? params.key : Object.keys(known);
  return {
    configurationKey: wanted.filter((k) => k in known).map((k) => ({ key: k, readonly: false, value: known[k] })),
    unknownKey: wanted.filter((k) => !(k in known)),
  };
});

async function send(method, params) {
  summary.sent[method] = (summary.sent[method] ?? 0) + 1;
  return client.call(method, params);
}

async function flow() {
  await client.connect();
  summary.subprotocol = client.protocol;
  const boot = await send('BootNotification', { chargePointVendor: 'lago-bridge-it', chargePointModel: 'ItNode' });
  summary.boot_status = boot.status;
  await send('Heartbeat', {});
  let meterWh = 1000;
  for (let s = 0; s < Number(args.sessions); s++) {
    const start = await send('StartTransaction', { connectorId: 1, idTag: args['id-tag'], meterStart: meterWh, timestamp: nowIso() });
    if (start.idTagInfo.status !== 'Accepted') throw new Error(`StartTransaction refused: ${JSON.stringify(start)}`);
    const tx = start.transactionId;
    summary.transaction_ids.push(tx);
    const meterStartWh = meterWh;
    for (let i = 0; i < Number(args['meter-values']); i++) {
      meterWh += 250 + i;
      // Alternate units: a billing tap must handle both Wh and kWh readings.
      const sampledValue = i % 2 === 0
        ? { value: String(meterWh), unit: 'Wh', measurand: 'Energy.Active.Import.Register', context: 'Sample.Periodic' }
        : { value: (meterWh / 1000).toFixed(3), unit: 'kWh', measurand: 'Energy.Active.Import.Register', context: 'Sample.Periodic' };
      await send('MeterValues', { connectorId: 1, transactionId: tx, meterValue: [{ timestamp: nowIso(), sampledValue: [sampledValue] }] });
    }
    meterWh += 100;
    await send('StopTransaction', { transactionId: tx, meterStop: meterWh, timestamp: nowIso(), idTag: args['id-tag'], reason: 'Local' });
    summary.meter_wh.push([meterStartWh, meterWh]);
  }
  if (args['expect-central-calls']) await centralCallsSeen;
  await client.close({ code: 1000, reason: 'done', awaitPending: true });
  summary.ok = true;
}

let timer;
const deadline = new Promise((_, reject) => {
  timer = setTimeout(() => reject(new Error(`flow did not finish within ${args.timeout} s`)), timeoutMs);
});
try {
  await Promise.race([flow(), deadline]);
} catch (err) {
  summary.error = `${err?.name ?? 'Error'}: ${err?.message ?? err}${err?.code ? ` (code ${err.code})` : ''}`;
  await client.close({ force: true }).catch(() => {});
} finally {
  clearTimeout(timer);
}
process.stdout.write(JSON.stringify(summary) + '\n');
process.exit(summary.ok ? 0 : 1);
