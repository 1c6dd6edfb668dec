#!/usr/bin/env python3
"""An OCPP 1.6-J central system built on the PyPI package `ocpp`, standing in for SteVe.

Accepts websocket connections on {path_prefix}/{chargeBoxId} only (anything else gets HTTP 404),
negotiates ocpp1.6, accepts every BootNotification and id tag, and assigns increasing
transaction ids; like SteVe, a repeated identical StartTransaction (same charger, connectorId, idTag,
meterStart and timestamp: a charger re-sending it after a lost reply) gets the same id again. With --initiate-calls it sends RemoteStartTransaction, Reset and
GetConfiguration to each charger after its BootNotification and checks the replies.

With --state-file PATH the transaction id counter and the Start dedupe map survive a restart, as
SteVe's database does: the file is rewritten atomically (temp file + rename) after every new
assignment, before the reply goes out, and read back at start. The dedupe map keeps the last
STARTS_KEPT Starts of each charge box: a charger only ever re-sends its latest Start, and a
bounded file keeps hours-long runs cheap.

The first stdout line is {"event": "listening", "port": N} once the socket is bound (use
--port 0 for an ephemeral port). Every event after that is one JSON line in --log (default
stdout): connected, call_received, central_call_result, disconnected.
"""

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
from datetime import datetime, timezone
from http import HTTPStatus

import websockets
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as Cp
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action

ARGS = None
LOG = sys.stdout
# (charge_box_id, connector_id, id_tag, meter_start, timestamp) -> transaction id already given.
STARTS = {}
# Starts remembered per charge box (oldest forgotten first).
STARTS_KEPT = 4
# The transaction id the next new Start gets.
NEXT_TRANSACTION_ID = 1


def log(event, **fields):
    LOG.write(json.dumps({"event": event, **fields}) + "\n")
    LOG.flush()


def now_iso():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class CentralSystemSide(Cp):
    """One charger's connection as seen by the central system."""

    def _got(self, action, payload):
        log("call_received", charge_box_id=self.id, action=action, payload=payload)

    @on(Action.boot_notification)
    def on_boot(self, charge_point_vendor, charge_point_model, **kwargs):
        self._got("BootNotification", {"vendor": charge_point_vendor, "model": charge_point_model})
        return call_result.BootNotification(current_time=now_iso(), interval=300, status="Accepted")

    @after(Action.boot_notification)
    async def after_boot(self, **kwargs):
        if ARGS.initiate_calls:
            await self.initiate_calls()

    @on(Action.heartbeat)
    def on_heartbeat(self, **kwargs):
        self._got("Heartbeat", {})
        return call_result.Heartbeat(current_time=now_iso())

    @on(Action.status_notification)
    def on_status(self, connector_id, error_code, status, **kwargs):
        self._got("StatusNotification", {"connector_id": connector_id, "status": status})
        return call_result.StatusNotification()

    @on(Action.start_transaction)
    def on_start(self, connector_id, id_tag, meter_start, timestamp, **kwargs):
        key = (self.id, connector_id, id_tag, meter_start, timestamp)
        tx = STARTS.get(key)
        if tx is None:
            tx = assign_transaction_id(key)
        self._got(
            "StartTransaction",
            {"id_tag": id_tag, "meter_start": meter_start, "transaction_id": tx, "connector_id": connector_id, "timestamp": timestamp},
        )
        return call_result.StartTransaction(transaction_id=tx, id_tag_info={"status": "Accepted"})

    @on(Action.meter_values)
    def on_meter_values(self, connector_id, meter_value, transaction_id=None, **kwargs):
        self._got("MeterValues", {"transaction_id": transaction_id, "meter_value": meter_value})
        return call_result.MeterValues()

    @on(Action.stop_transaction)
    def on_stop(self, meter_stop, timestamp, transaction_id, **kwargs):
        self._got("StopTransaction", {"transaction_id": transaction_id, "meter_stop": meter_stop, "timestamp": timestamp})
        return call_result.StopTransaction(id_tag_info={"status": "Accepted"})

    async def initiate_calls(self):
        checks = [
            (call.RemoteStartTransaction(id_tag="TAG-REMOTE", connector_id=1), lambda r: r.status == "Accepted"),
            (call.Reset(type="Soft"), lambda r: r.status == "Accepted"),
            (
                call.GetConfiguration(key=["HeartbeatInterval"]),
                lambda r: any(k.get("key") == "HeartbeatInterval" for k in (r.configuration_key or [])),
            ),
        ]
        for request, check in checks:
            action = request.__class__.__name__
            try:
                response = await self.call(request, suppress=False)
                ok = bool(check(response))
                log("central_call_result", charge_box_id=self.id, action=action, ok=ok, response=repr(response))
            except Exception as e:  # noqa: BLE001 - any failure is reported as a failed check
                log("central_call_result", charge_box_id=self.id, action=action, ok=False, error=f"{type(e).__name__}: {e}")


def assign_transaction_id(key):
    """A new transaction id for Start `key`, persisted (with --state-file) before it is answered."""
    global NEXT_TRANSACTION_ID
    tx = NEXT_TRANSACTION_ID
    NEXT_TRANSACTION_ID += 1
    STARTS[key] = tx
    mine = [k for k in STARTS if k[0] == key[0]]
    for old in mine[:-STARTS_KEPT]:
        del STARTS[old]
    if ARGS.state_file:
        save_state(ARGS.state_file)
    return tx


def save_state(path):
    state = {"next_transaction_id": NEXT_TRANSACTION_ID, "starts": [[*k, tx] for k, tx in STARTS.items()]}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    # A SIGKILL leaves either the old file or the new one, never half of one.
    os.replace(tmp, path)


def load_state(path):
    global NEXT_TRANSACTION_ID
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return
    NEXT_TRANSACTION_ID = max(NEXT_TRANSACTION_ID, state["next_transaction_id"])
    for *key, tx in state["starts"]:
        STARTS[tuple(key)] = tx


def check_request(connection, request):
    prefix = ARGS.path_prefix.rstrip("/") + "/"
    path = request.path.split("?", 1)[0]
    if not path.startswith(prefix) or "/" in path[len(prefix):] or path == prefix:
        return connection.respond(HTTPStatus.NOT_FOUND, "unknown path\n")
    if ARGS.password is not None:
        charge_box_id = path[len(prefix):]
        want = "Basic " + base64.b64encode(f"{charge_box_id}:{ARGS.password}".encode()).decode()
        if request.headers.get("Authorization") != want:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad credentials\n")
    return None


async def handle(ws):
    path = ws.request.path.split("?", 1)[0]
    charge_box_id = path.rsplit("/", 1)[-1]
    log(
        "connected",
        charge_box_id=charge_box_id,
        path=ws.request.path,
        subprotocol=ws.subprotocol,
        offered=ws.request.headers.get("Sec-WebSocket-Protocol"),
        authorization=ws.request.headers.get("Authorization"),
    )
    cs = CentralSystemSide(charge_box_id, ws, response_timeout=ARGS.call_timeout)
    try:
        await cs.start()
    except websockets.ConnectionClosed as e:
        log("disconnected", charge_box_id=charge_box_id, code=e.rcvd.code if e.rcvd else None)


async def main():
    global ARGS, LOG, NEXT_TRANSACTION_ID
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--path-prefix", default="/steve/websocket/CentralSystemService")
    p.add_argument("--log", default=None, help="file for event lines (default stdout)")
    p.add_argument("--initiate-calls", action="store_true")
    p.add_argument("--first-transaction-id", type=int, default=1)
    p.add_argument("--password", default=None, help="require HTTP basic auth, username = charge box id")
    p.add_argument("--call-timeout", type=float, default=20.0)
    p.add_argument("--state-file", default=None, help="keep transaction ids and Start dedupe across restarts")
    ARGS = p.parse_args()
    if ARGS.log:
        LOG = open(ARGS.log, "a", buffering=1)
    NEXT_TRANSACTION_ID = ARGS.first_transaction_id
    if ARGS.state_file:
        load_state(ARGS.state_file)

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with websockets.serve(
        handle,
        ARGS.host,
        ARGS.port,
        subprotocols=["ocpp1.6"],
        process_request=check_request,
        max_size=16 * 2**20,
        backlog=2048,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"event": "listening", "port": port}), flush=True)
        await stop
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
