#!/usr/bin/env python3
"""An OCPP 1.6-J charge point built on the PyPI package `ocpp`, driven by CLI arguments.

Each connection does BootNotification, Heartbeat, then N charging sessions (StartTransaction,
MeterValues in Wh and kWh, StopTransaction), and answers the central system's
RemoteStartTransaction, Reset and GetConfiguration. With --expect-central-calls it waits for
those three calls before closing. With --connections N it opens N connections concurrently
(ids "{id}-{i}") in one asyncio process. It prints one JSON line summary on stdout and exits 0
only if every connection completed its flow.

With --clock T every timestamp the charger sends is fixed: T, then one minute later per message
(per connection), so a recorded exchange is reproducible. With --retry a CALL whose connection
drops or whose reply does not come within --call-timeout is re-sent unchanged (same payload) on a
new connection, as OCPP 1.6 TransactionMessageAttempts prescribes for transaction messages; the
flow goes on from there (no new BootNotification, as after a mere connection loss).

With --seed S every session has a random shape, reproducible from S and the charge box id: a
random register at the first Start, 0 to --meter-values MeterValues, random energy per reading
(zero included), readings in Wh (whole or tenths) and kWh (up to 4 decimals, trailing zeros
trimmed or not), and a Stop at a whole Wh at or above the last reading.
"""

import argparse
import asyncio
import base64
import json
import random
import sys
import time
from datetime import datetime, timedelta, timezone

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as Cp
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action

CENTRAL_CALLS = ("RemoteStartTransaction", "Reset", "GetConfiguration")


def iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Clock:
    """The charger's clock: real time, or (with --clock) a fixed start advancing 1 min per reading."""

    def __init__(self, fixed=None):
        self.next = None if fixed is None else datetime.fromisoformat(fixed.replace("Z", "+00:00"))

    def now_iso(self):
        if self.next is None:
            return iso(datetime.now(timezone.utc))
        moment = self.next
        self.next = moment + timedelta(minutes=1)
        return iso(moment)


class Link:
    """The charger's connection; with --retry it survives drops by reconnecting and re-sending."""

    def __init__(self, args, charge_box_id, deadline):
        self.args = args
        self.charge_box_id = charge_box_id
        self.deadline = deadline
        self.cp = None
        self.ws = None
        self.reader = None
        self.sent = {}
        self.received_calls = {}
        self.central_calls_seen = asyncio.Event()
        self.reconnects = 0
        self.subprotocol = None

    async def connect(self):
        url = f"{self.args.url.rstrip('/')}/{self.charge_box_id}"
        headers = {}
        if self.args.password is not None:
            token = base64.b64encode(f"{self.charge_box_id}:{self.args.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no connection before the deadline")
            try:
                self.ws = await websockets.connect(
                    url,
                    subprotocols=self.args.subprotocols.split(","),
                    additional_headers=headers,
                    open_timeout=min(left, self.args.call_timeout if self.args.retry else left),
                    max_size=16 * 2**20,
                )
                break
            except Exception:  # noqa: BLE001 - without --retry the first failure is the answer
                if not self.args.retry:
                    raise
                await asyncio.sleep(0.1)
        self.subprotocol = self.ws.subprotocol
        timeout = self.args.call_timeout if self.args.retry else max(self.deadline - time.monotonic(), 1)
        self.cp = ChargePoint(self.charge_box_id, self.ws, response_timeout=timeout)
        # Central-system calls are counted across connections.
        self.cp.received_calls = self.received_calls
        self.cp.central_calls_seen = self.central_calls_seen
        self.reader = asyncio.create_task(self.cp.start())

    async def close(self):
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            try:
                # A peer that died never answers the close handshake: do not wait for it.
                await asyncio.wait_for(self.ws.close(), 1.0)
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass

    async def send(self, payload):
        """Sends a CALL, counts it, and fails loudly on a CALLERROR (suppress=False)."""
        name = payload.__class__.__name__
        self.sent[name] = self.sent.get(name, 0) + 1
        if not self.args.retry:
            return await self.cp.call(payload, suppress=False)
        while True:
            if time.monotonic() >= self.deadline:
                raise TimeoutError(f"{name} unanswered before the deadline")
            call_task = asyncio.create_task(self.cp.call(payload, suppress=False))
            done, _ = await asyncio.wait(
                {call_task, self.reader}, timeout=self.args.call_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if call_task in done and call_task.exception() is None:
                return call_task.result()
            if call_task in done and not isinstance(
                call_task.exception(), (asyncio.TimeoutError, websockets.ConnectionClosed)
            ):
                raise call_task.exception()
            # Dropped or unanswered: a new connection, the same payload.
            call_task.cancel()
            await self.close()
            self.reconnects += 1
            await self.connect()


class ChargePoint(Cp):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = {}
        self.received_calls = {}
        self.central_calls_seen = asyncio.Event()

    def _saw(self, action):
        self.received_calls[action] = self.received_calls.get(action, 0) + 1
        if all(a in self.received_calls for a in CENTRAL_CALLS):
            self.central_calls_seen.set()

    @on(Action.remote_start_transaction)
    def on_remote_start(self, id_tag, **kwargs):
        self._saw("RemoteStartTransaction")
        return call_result.RemoteStartTransaction(status="Accepted")

    @on(Action.reset)
    def on_reset(self, type, **kwargs):
        self._saw("Reset")
        return call_result.Reset(status="Accepted")

    @on(Action.get_configuration)
    def on_get_configuration(self, key=None, **kwargs):
        self._saw("GetConfiguration")
        known = {"HeartbeatInterval": "300", "MeterValueSampleInterval": "60"}
        wanted = key if key else list(known)
        return call_result.GetConfiguration(
            configuration_key=[{"key": k, "readonly": False, "value": known[k]} for k in wanted if k in known],
            unknown_key=[k for k in wanted if k not in known],
        )


def reading_text(tenths_wh, rng):
    """A register of `tenths_wh` tenths of a Wh as a (value, unit) a charger might send."""
    forms = [("kwh4", "kWh"), ("kwh_trim", "kWh"), ("wh1", "Wh")]
    if tenths_wh % 10 == 0:
        forms.append(("wh", "Wh"))
    form, unit = rng.choice(forms)
    if form == "wh":
        return str(tenths_wh // 10), unit
    if form == "wh1":
        return f"{tenths_wh // 10}.{tenths_wh % 10}", unit
    text = f"{tenths_wh // 10000}.{tenths_wh % 10000:04d}"
    if form == "kwh_trim":
        text = text.rstrip("0").rstrip(".")
    return text, unit


class Shape:
    """Session shapes: the fixed pattern, or (with --seed) random ones."""

    def __init__(self, seed, charge_box_id, max_meter_values):
        self.rng = None if seed is None else random.Random(f"{seed}:{charge_box_id}")
        self.max_meter_values = max_meter_values

    def first_register_wh(self):
        return 1_000 if self.rng is None else self.rng.randint(0, 5_000_000)

    def meter_values(self):
        return self.max_meter_values if self.rng is None else self.rng.randint(0, self.max_meter_values)

    def reading(self, i, tenths_wh):
        """The register after reading i (tenths of Wh) and the sampled value to send."""
        if self.rng is None:
            tenths_wh += (250 + i) * 10
            wh = tenths_wh // 10
            # Alternate units: a billing tap must handle both Wh and kWh readings.
            if i % 2 == 0:
                return tenths_wh, sampled(str(wh), "Wh")
            return tenths_wh, sampled(f"{wh / 1000:.3f}", "kWh")
        tenths_wh += self.rng.choice([0, self.rng.randint(1, 99), self.rng.randint(100, 500_000)])
        return tenths_wh, sampled(*reading_text(tenths_wh, self.rng))

    def stop_wh(self, tenths_wh):
        """A whole-Wh meterStop at or above the register (tenths of Wh)."""
        wh = -(-tenths_wh // 10)
        return wh + (100 if self.rng is None else self.rng.choice([0, self.rng.randint(1, 30_000)]))


def sampled(value, unit, measurand="Energy.Active.Import.Register"):
    return {"value": value, "unit": unit, "measurand": measurand, "context": "Sample.Periodic"}


async def run_flow(cp, sessions, shape, expect_central_calls, id_tag, clock, interval):
    result = {"charge_box_id": cp.charge_box_id, "transaction_ids": [], "meter_wh": []}
    boot = await cp.send(call.BootNotification(charge_point_model="ItPy", charge_point_vendor="lago-bridge-it"))
    result["boot_status"] = str(boot.status)
    await cp.send(call.Heartbeat())
    now_iso = clock.now_iso
    meter_wh = shape.first_register_wh()
    for session in range(sessions):
        start = await cp.send(
            call.StartTransaction(connector_id=1, id_tag=id_tag, meter_start=meter_wh, timestamp=now_iso())
        )
        if str(start.id_tag_info["status"]) != "Accepted":
            raise RuntimeError(f"StartTransaction refused: {start.id_tag_info}")
        tx = start.transaction_id
        await asyncio.sleep(interval)
        result["transaction_ids"].append(tx)
        meter_start_wh = meter_wh
        register_tenths_wh = meter_wh * 10
        for i in range(shape.meter_values()):
            register_tenths_wh, value = shape.reading(i, register_tenths_wh)
            values = [value]
            await cp.send(
                call.MeterValues(
                    connector_id=1,
                    transaction_id=tx,
                    meter_value=[{"timestamp": now_iso(), "sampledValue": values}],
                )
            )
            await asyncio.sleep(interval)
        meter_wh = shape.stop_wh(register_tenths_wh)
        await cp.send(
            call.StopTransaction(
                meter_stop=meter_wh, timestamp=now_iso(), transaction_id=tx, id_tag=id_tag, reason="Local"
            )
        )
        result["meter_wh"].append([meter_start_wh, meter_wh])
        await asyncio.sleep(interval)
    if expect_central_calls:
        await cp.central_calls_seen.wait()
    return result


async def one_connection(args, charge_box_id, timeout_s):
    summary = {"charge_box_id": charge_box_id, "ok": False}
    link = Link(args, charge_box_id, time.monotonic() + timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            await link.connect()
            summary["subprotocol"] = link.subprotocol
            try:
                flow = await run_flow(
                    link,
                    args.sessions,
                    Shape(args.seed, charge_box_id, args.meter_values),
                    args.expect_central_calls,
                    args.id_tag,
                    Clock(args.clock),
                    args.interval,
                )
            finally:
                await link.close()
            summary.update(flow)
            summary["sent"] = link.sent
            summary["received_calls"] = link.received_calls
            if args.retry:
                summary["reconnects"] = link.reconnects
            summary["ok"] = True
    except BaseException as e:  # noqa: BLE001 - the summary must say what failed, whatever it was
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        summary["error"] = f"{type(e).__name__}: {e}"
    return summary


async def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="base URL; the charge box id is appended as a path segment")
    p.add_argument("--id", required=True, help="charge box id (with --connections > 1: a prefix)")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--meter-values", type=int, default=3, help="MeterValues per session (with --seed: at most)")
    p.add_argument("--connections", type=int, default=1, help="concurrent connections in this process")
    p.add_argument("--expect-central-calls", action="store_true", help="wait for RemoteStart, Reset, GetConfiguration")
    p.add_argument("--subprotocols", default="ocpp1.6")
    p.add_argument("--password", default=None, help="send HTTP basic auth with username = charge box id")
    p.add_argument("--id-tag", default="TAG-IT-1")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for each connection's whole flow")
    p.add_argument("--details", action="store_true", help="with --connections > 1: include every connection")
    p.add_argument("--clock", default=None, help="fixed clock start (ISO 8601); each timestamp sent adds 1 min")
    p.add_argument("--retry", action="store_true", help="re-send an unanswered CALL unchanged on a new connection")
    p.add_argument("--call-timeout", type=float, default=5.0, help="with --retry: seconds before a CALL is re-sent")
    p.add_argument("--interval", type=float, default=0.0, help="seconds to pause after each transaction message")
    p.add_argument("--seed", type=int, default=None, help="random session shapes, reproducible from this seed")
    args = p.parse_args()

    started = time.monotonic()
    if args.connections == 1:
        summary = await one_connection(args, args.id, args.timeout)
        print(json.dumps(summary), flush=True)
        return 0 if summary["ok"] else 1

    results = await asyncio.gather(
        *(one_connection(args, f"{args.id}-{i}", args.timeout) for i in range(args.connections))
    )
    failed = [r for r in results if not r["ok"]]
    summary = {
        "connections": args.connections,
        "ok_connections": args.connections - len(failed),
        "failed": failed[:10],
        "transactions": sum(len(r.get("transaction_ids", [])) for r in results),
        "elapsed_s": round(time.monotonic() - started, 3),
        "ok": not failed,
    }
    if args.details:
        summary["results"] = results
    print(json.dumps(summary), flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
