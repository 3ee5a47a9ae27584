"""The daemon end to end with live sources: `appliance run` in a subprocess fed by a real
mosquitto, NMEA 0183 datagrams over UDP and a real pymodbus TCP device, all on 127.0.0.1. What
reaches the journal (readings, data-quality records, the position stamped once a fix arrives),
the MQTT source's health in `appliance status --json` across a broker restart, and a clean stop
on SIGTERM with every source connected."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from functools import reduce
from operator import xor
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from sync import JournalReader
from sync.errors import JournalMissing
from sync.records import StoredRecord
from tests.helpers import (
    component_missing,
    log_events,
    start_daemon,
    status_json,
    stop_daemon,
    wait_for,
    write_config,
)
from tests.mosquitto import MOSQUITTO, Broker

SERVER_WAIT_S = 10.0
# The daemon in a subprocess imports the whole appliance before it starts its sources, and the
# machine running the tests is shared: generous, since every wait ends as soon as it is met.
DAEMON_WAIT_S = 25.0
# The daemon writes its heartbeat (what `status` reads) every 5 s.
HEARTBEAT_WAIT_S = 12.0
WINDOW = "500ms"

# The Modbus device. Not pymodbus' default unit 1: a daemon that ignored `unit` gets nothing.
UNIT = 3
SPEED_WORD = 1234  # holding 0, uint16 x 0.1 -> 123.4
POWER_WORDS = (0x3FC0, 0x0000)  # holding 1..2, float32 1.5 (IEEE 754 0x3FC00000)
TEMP_WORD = 0xFFFE  # input 0, int16 -2 -> -2 x 0.5 + 10 = 9.0
MISSING_ADDRESS = 40  # configured but not served: the device answers ILLEGAL_ADDRESS

# The fix: Sydney, in the southern and eastern hemispheres, so a sign error shows.
FIX_LAT = -(33 + 52.128 / 60)
FIX_LON = 151 + 12.558 / 60


def sentence(body: str) -> str:
    """`body` framed with its checksum (XOR of the characters between the $ and the *)."""
    return f"${body}*{reduce(xor, body.encode('ascii'), 0):02X}"


NO_FIX_GGA = sentence("GPGGA,101500.00,,,,,0,00,99.99,,,,,,")
FIX_GGA = sentence("GPGGA,101530.00,3352.128,S,15112.558,E,1,09,0.8,12.0,M,22.1,M,,")
FIX_RMC = sentence("GPRMC,101530.00,A,3352.128,S,15112.558,E,5.2,87.0,150326,,,A")


def with_wrong_checksum(framed: str) -> str:
    """`framed` with its checksum altered, as a bit flipped in transit would leave it."""
    body, _, checksum = framed.rpartition("*")
    return f"{body}*{int(checksum, 16) ^ 0x5A:02X}"


# A valid fix elsewhere (Hamburg) with a checksum that does not match: it must be refused, and
# must never become the position.
BAD_CHECKSUM_GGA = with_wrong_checksum(
    sentence("GPGGA,101500.00,5333.000,N,00959.000,E,1,08,0.9,5.0,M,40.0,M,,")
)


def _free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- the servers ---------------------------------------------------------------------------


class ModbusDevice:
    """A pymodbus TCP server on 127.0.0.1, on an event loop in a thread of its own: it answers
    the daemon's polls while the test blocks waiting on the daemon."""

    def __init__(self, holding: Mapping[int, int], inputs: Mapping[int, int]) -> None:
        self._holding = dict(holding)
        self._inputs = dict(inputs)
        self._ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="modbus-device", daemon=True)
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        self.port = self._ready.result(timeout=SERVER_WAIT_S)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with suppress(RuntimeError):  # the loop already ended (the server failed)
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(SERVER_WAIT_S)
        assert not self._thread.is_alive(), "the Modbus device did not stop"
        if self._failure is not None:
            raise AssertionError(f"the Modbus device failed: {self._failure!r}")

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by stop(), in the test's thread
            self._failure = exc
            if not self._ready.done():
                self._ready.set_exception(exc)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()

        def blocks(words: Mapping[int, int]) -> list[SimData]:
            return [
                SimData(address, values=[word], datatype=DataType.REGISTERS)
                for address, word in sorted(words.items())
            ]

        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        device = SimDevice(
            id=UNIT, simdata=(bits, list(bits), blocks(self._holding), blocks(self._inputs))
        )
        server = ModbusTcpServer(device, address=("127.0.0.1", 0))
        await server.serve_forever(background=True)
        try:
            listening: Any = server.transport
            self._ready.set_result(int(listening.sockets[0].getsockname()[1]))
            await self._stop.wait()
        finally:
            await server.shutdown()  # type: ignore[no-untyped-call]  # unannotated upstream


# --- the rig: servers, config, and what the test sends --------------------------------------


@dataclass
class Rig:
    """The servers of one test and the daemon's config pointing at them."""

    broker: Broker
    device: ModbusDevice
    nmea_port: int
    config: Path
    data: Path
    log: Path

    def publish(self, *messages: tuple[str, bytes]) -> None:
        """Publish with QoS 1; returns once the broker has each one."""

        async def send() -> None:
            async with aiomqtt.Client(
                "127.0.0.1", self.broker.port, identifier="test-publisher"
            ) as client:
                for topic, payload in messages:
                    await client.publish(topic, payload, qos=1)

        asyncio.run(send())

    def send_nmea(self, *sentences: str) -> None:
        """One datagram holding `sentences`, to the daemon's NMEA listener."""
        payload = "".join(f"{s}\r\n" for s in sentences).encode("ascii")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(payload, ("127.0.0.1", self.nmea_port))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    if not MOSQUITTO.exists():
        component_missing("mosquitto (Debian package mosquitto)")
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    broker = Broker(broker_dir, ["allow_anonymous true"])
    broker.start()
    device = ModbusDevice(
        holding={0: SPEED_WORD, 1: POWER_WORDS[0], 2: POWER_WORDS[1]}, inputs={0: TEMP_WORD}
    )
    try:
        device.start()
        nmea_port = _free_port(socket.SOCK_DGRAM)
        data = tmp_path / "data"
        live = {"window": WINDOW, "reconnect_max": "500ms"}
        sensors: list[dict[str, Any]] = [
            {
                "name": "line",
                "type": "mqtt",
                "host": "127.0.0.1",
                "port": broker.port,
                "keepalive": "5s",
                "topics": [
                    {"topic": "line/probe", "channel": "probe"},
                    {"topic": "line/temp", "channel": "temp"},
                    {
                        "topic": "line/state",
                        "channel": "current",
                        "field": "motor.current",
                        "scale": 0.5,
                    },
                ],
                **live,
            },
            {
                "name": "gps",
                "type": "nmea",
                "transport": "udp",
                "host": "127.0.0.1",
                "port": nmea_port,
                **live,
            },
            {
                "name": "plc",
                "type": "modbus",
                "host": "127.0.0.1",
                "port": device.port,
                "unit": UNIT,
                "poll": "100ms",
                "timeout": "1s",
                "registers": [
                    {"channel": "speed", "address": 0, "scale": 0.1},
                    {"channel": "power", "address": 1, "type": "float32"},
                    {
                        "channel": "temp",
                        "address": 0,
                        "table": "input",
                        "type": "int16",
                        "scale": 0.5,
                        "offset": 10,
                    },
                    {"channel": "missing", "address": MISSING_ADDRESS},
                ],
                **live,
            },
        ]
        config = write_config(tmp_path / "c.yaml", data, sensors)
        yield Rig(broker, device, nmea_port, config, data, tmp_path / "daemon.log")
    finally:
        device.stop()
        broker.kill()


@pytest.fixture
def daemon(rig: Rig) -> Iterator[subprocess.Popen[bytes]]:
    """`appliance run` on the rig's config; killed after the test if it is still running."""
    proc = start_daemon(rig.config, rig.log)
    try:
        wait_for(lambda: _has_started(rig.data), DAEMON_WAIT_S, "the daemon's started record")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=SERVER_WAIT_S)


# --- reading the journal --------------------------------------------------------------------


def _records(data: Path) -> list[StoredRecord]:
    with JournalReader.open(data) as reader:
        return list(reader.iter_records())


def _has_started(data: Path) -> bool:
    """Whether the daemon has journalled its `started` record (the journal file appears before
    its tables do)."""
    try:
        with JournalReader.open(data) as reader:
            return any(True for _ in reader.iter_records(kind="lifecycle"))
    except (JournalMissing, sqlite3.OperationalError):
        return False


def _quality(data: Path) -> dict[tuple[str, str], int]:
    with JournalReader.open(data) as reader:
        return {(source, reason): count for source, reason, count in reader.quality()}


def _heartbeat(data: Path) -> dict[str, Any]:
    """The daemon's last heartbeat, as `status` reads it (cheaper than running `status`)."""
    with JournalReader.open(data) as reader:
        raw = reader.meta("daemon")
    beat: dict[str, Any] = json.loads(raw) if raw else {}
    return beat


def _features(records: list[StoredRecord], source: str, channel: str) -> list[dict[str, Any]]:
    """The features of `channel` in each reading of `source` that had values for it."""
    found = []
    for record in records:
        if record.source == source and record.kind == "reading":
            features = record.body["channels"].get(channel)
            if features is not None and features["n"]:
                found.append(features)
    return found


@dataclass(frozen=True)
class Seen:
    """What the readings of one channel add up to, however the values fell into windows."""

    n: int
    low: float
    high: float
    mean: float


def _seen(records: list[StoredRecord], source: str, channel: str) -> Seen | None:
    windows = _features(records, source, channel)
    if not windows:
        return None
    n = sum(int(w["n"]) for w in windows)
    return Seen(
        n=n,
        low=min(float(w["min"]) for w in windows),
        high=max(float(w["max"]) for w in windows),
        mean=sum(float(w["mean"]) * int(w["n"]) for w in windows) / n,
    )


def _quality_details(records: list[StoredRecord], source: str) -> list[dict[str, Any]]:
    return [
        example
        for record in records
        if record.source == source and record.kind == "data_quality"
        for example in record.body["examples"]
    ]


def _until_mqtt_flows(rig: Rig, value: float, what: str) -> None:
    """Publish `value` on the probe topic until it reaches the journal: only then is the daemon's
    MQTT client subscribed (what is published before that is not delivered to it)."""

    def arrived() -> bool:
        rig.publish(("line/probe", str(value).encode()))
        return any(f["max"] == value for f in _features(_records(rig.data), "line", "probe"))

    wait_for(arrived, DAEMON_WAIT_S, what, interval=0.3)


def _until_sources(rig: Rig, check: Callable[[dict[str, Any]], bool], what: str) -> None:
    wait_for(lambda: check(_heartbeat(rig.data).get("sources", {})), HEARTBEAT_WAIT_S, what)


# --- the tests ------------------------------------------------------------------------------


def test_live_values_quality_and_position_reach_the_journal(
    rig: Rig, daemon: subprocess.Popen[bytes]
) -> None:
    # Modbus is polled from the start; MQTT and NMEA deliver only once subscribed / bound.
    wait_for(lambda: _features(_records(rig.data), "plc", "speed"), DAEMON_WAIT_S, "modbus")
    _until_mqtt_flows(rig, 1.0, "the MQTT subscription")

    def no_fix_arrived() -> bool:
        rig.send_nmea(NO_FIX_GGA)
        return bool(_features(_records(rig.data), "gps", "fix_quality"))

    wait_for(no_fix_arrived, DAEMON_WAIT_S, "the NMEA listener", interval=0.3)

    rig.publish(
        ("line/temp", b"21.5"),
        ("line/state", b'{"motor": {"current": 8}}'),
        ("line/temp", b"warm"),
        ("line/temp", b"22.5"),
        ("line/state", b'{"motor": {}}'),
        ("line/state", b'{"motor": {"current": "12"}}'),
        ("line/temp", b"23.5"),
    )
    rig.send_nmea(BAD_CHECKSUM_GGA)

    def all_arrived() -> bool:
        records, quality = _records(rig.data), _quality(rig.data)
        temp, current = _seen(records, "line", "temp"), _seen(records, "line", "current")
        return (
            temp is not None
            and temp.n == 3
            and current is not None
            and current.n == 2
            and quality.get(("line", "malformed")) == 2
            and quality.get(("gps", "bad_checksum")) == 1
            and ("plc", "malformed") in quality
        )

    wait_for(all_arrived, DAEMON_WAIT_S, "the published values and the bad input")
    records = _records(rig.data)
    assert _seen(records, "line", "temp") == Seen(n=3, low=21.5, high=23.5, mean=22.5)
    assert _seen(records, "line", "current") == Seen(n=2, low=4.0, high=6.0, mean=5.0)
    speed, power = _seen(records, "plc", "speed"), _seen(records, "plc", "power")
    plc_temp = _seen(records, "plc", "temp")
    assert speed is not None and speed.low == speed.high == pytest.approx(123.4)
    assert power is not None and power.low == power.high == 1.5
    assert plc_temp is not None and plc_temp.low == plc_temp.high == 9.0
    assert _seen(records, "plc", "missing") is None
    fix_quality = _seen(records, "gps", "fix_quality")
    assert fix_quality is not None and fix_quality.high == 0.0
    assert _seen(records, "gps", "lat") is None  # a receiver without a fix has no position

    line_problems = {e["detail"] for e in _quality_details(records, "line")}
    assert "line/temp: payload 'warm' is not a number" in line_problems
    assert any(d.startswith("line/state: JSON has no field 'motor.current'") for d in line_problems)
    assert {e["reason"] for e in _quality_details(records, "line")} == {"malformed"}
    (bad_sum,) = _quality_details(records, "gps")
    assert bad_sum["reason"] == "bad_checksum"
    assert "expected checksum" in bad_sum["detail"] and "5333.000" in bad_sum["detail"]
    (refused,) = _quality_details(records, "plc")
    assert refused["reason"] == "malformed"
    assert f"missing: holding register {MISSING_ADDRESS}" in refused["detail"]
    assert "ILLEGAL_ADDRESS" in refused["detail"]

    # No fix yet (the refused sentence had one): nothing carries a position.
    assert not [r.seq for r in records if "position" in r.body]
    before_fix = max(r.seq for r in records)

    rig.send_nmea(FIX_GGA, FIX_RMC)
    wait_for(lambda: _seen(_records(rig.data), "gps", "lat"), DAEMON_WAIT_S, "the fix in a reading")
    # The fix is known now: what MQTT and Modbus deliver from here on is stamped with it.
    rig.publish(("line/temp", b"30"))

    def stamped_from_every_source() -> bool:
        records = _records(rig.data)
        return all(
            any(
                r.source == source and r.kind == "reading" and "position" in r.body for r in records
            )
            for source in ("line", "gps", "plc")
        )

    wait_for(stamped_from_every_source, DAEMON_WAIT_S, "readings of every source after the fix")
    _until_sources(
        rig,
        lambda sources: all(
            sources.get(name, {}).get("state") == "running" for name in ("line", "gps", "plc")
        ),
        "every source running in the heartbeat",
    )
    report = status_json(rig.config)
    assert report["daemon"]["running"] is True
    for name in ("line", "gps", "plc"):
        assert report["daemon"]["sources"][name]["state"] == "running", name
        assert report["daemon"]["sources"][name]["windows"] > 0, name
    # The source's own counters: every message taken, the two it could not read.
    line_extra = report["daemon"]["sources"]["line"]["extra"]
    assert line_extra["malformed"] == 2 and line_extra["messages"] >= 8
    assert report["daemon"]["sources"]["plc"]["extra"]["polls"] > 0
    shown_quality = {(q["source"], q["reason"]): q["count"] for q in report["data_quality"]}
    assert shown_quality[("line", "malformed")] == 2
    assert shown_quality[("gps", "bad_checksum")] == 1
    assert shown_quality[("plc", "malformed")] >= 1

    assert stop_daemon(daemon) == 0
    records = _records(rig.data)
    gps_lat, gps_lon = _seen(records, "gps", "lat"), _seen(records, "gps", "lon")
    assert gps_lat is not None and gps_lat.mean == pytest.approx(FIX_LAT)
    assert gps_lon is not None and gps_lon.mean == pytest.approx(FIX_LON)
    temp_after = _seen(records, "line", "temp")
    assert temp_after is not None and temp_after.n == 4 and temp_after.high == 30.0

    assert all("position" not in r.body for r in records if r.seq <= before_fix)
    first_stamped = min(r.seq for r in records if "position" in r.body)
    assert first_stamped > before_fix
    later = [r for r in records if r.seq >= first_stamped]
    unstamped = [(r.seq, r.source, r.kind) for r in later if "position" not in r.body]
    assert not unstamped, f"records after the fix without a position: {unstamped}"
    for record in later:
        position = record.body["position"]
        assert position["lat"] == pytest.approx(FIX_LAT), record.seq
        assert position["lon"] == pytest.approx(FIX_LON), record.seq
    # Every kind the daemon writes is stamped, the final lifecycle record included.
    assert later[-1].kind == "lifecycle" and later[-1].body["event"] == "stopped"
    assert later[-1].body["position"]["sog_kn"] == 5.2
    assert later[-1].body["position"]["cog_deg"] == 87.0
    assert {r.source for r in later if r.kind == "reading"} == {"line", "gps", "plc"}


def test_mqtt_broker_restart_shows_in_status_and_loses_nothing(
    rig: Rig, daemon: subprocess.Popen[bytes]
) -> None:
    _until_mqtt_flows(rig, 1.0, "the MQTT subscription")
    rig.publish(("line/temp", b"40"))
    wait_for(lambda: _seen(_records(rig.data), "line", "temp"), DAEMON_WAIT_S, "a temperature")
    kept = {r.seq: r for r in _records(rig.data)}
    counts = [len(kept)]

    rig.broker.kill()
    _until_sources(
        rig,
        lambda sources: sources.get("line", {}).get("state") == "reconnecting",
        "the MQTT source reconnecting in the heartbeat",
    )
    report = status_json(rig.config)
    line = report["daemon"]["sources"]["line"]
    assert line["state"] == "reconnecting"
    assert line["error"]
    # The source copes by itself: its supervised task neither failed nor restarted.
    component = report["daemon"]["components"]["source:line"]
    assert component["state"] == "running" and component["restarts"] == 0
    assert report["daemon"]["sources"]["plc"]["state"] == "running"
    counts.append(len(_records(rig.data)))
    plc_before = len(_features(list(kept.values()), "plc", "speed"))
    # The other sources go on while the broker is away.
    wait_for(
        lambda: len(_features(_records(rig.data), "plc", "speed")) > plc_before + 2,
        DAEMON_WAIT_S,
        "modbus readings while the broker is down",
    )
    counts.append(len(_records(rig.data)))

    rig.broker.start()  # same port; no persistence, so the daemon must subscribe again
    _until_mqtt_flows(rig, 2.0, "values after the broker restart")
    counts.append(len(_records(rig.data)))
    _until_sources(
        rig,
        lambda sources: (
            sources.get("line", {}).get("state") == "running"
            and sources["line"].get("reconnects", 0) >= 1
        ),
        "the MQTT source running again in the heartbeat",
    )
    report = status_json(rig.config)
    line = report["daemon"]["sources"]["line"]
    assert line["state"] == "running"
    assert line["reconnects"] >= 1
    assert line["error"] is None
    rig.publish(("line/temp", b"41"))
    wait_for(
        lambda: (temp := _seen(_records(rig.data), "line", "temp")) is not None and temp.n == 2,
        DAEMON_WAIT_S,
        "a temperature after the restart",
    )

    assert stop_daemon(daemon) == 0
    final = _records(rig.data)
    counts.append(len(final))
    assert counts == sorted(counts), f"the record count went down: {counts}"
    seqs = [r.seq for r in final]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seqs are not contiguous"
    by_seq = {r.seq: r for r in final}
    lost = [seq for seq, record in kept.items() if by_seq.get(seq) != record]
    assert not lost, f"records journalled before the broker died are gone or changed: {lost}"
    temp = _seen(final, "line", "temp")
    assert temp == Seen(n=2, low=40.0, high=41.0, mean=40.5)


def test_sigterm_stops_cleanly_with_live_sources_connected(
    rig: Rig, daemon: subprocess.Popen[bytes]
) -> None:
    _until_mqtt_flows(rig, 1.0, "the MQTT subscription")
    wait_for(lambda: _features(_records(rig.data), "plc", "speed"), DAEMON_WAIT_S, "modbus")
    _until_sources(
        rig,
        lambda sources: all(
            sources.get(name, {}).get("state") == "running" for name in ("line", "gps", "plc")
        ),
        "every source connected",
    )
    started = time.monotonic()
    assert stop_daemon(daemon) == 0
    assert time.monotonic() - started < 10

    records = _records(rig.data)
    lifecycle = [r.body for r in records if r.kind == "lifecycle"]
    assert [(b["event"], b.get("reason")) for b in lifecycle] == [
        ("started", None),
        ("stopped", "SIGTERM"),
    ]
    assert records[-1].kind == "lifecycle"
    # The last health record, written on the way out, says each source was closed, not left
    # running or failed.
    final_health = [r.body for r in records if r.kind == "health"][-1]
    assert {name: final_health["sources"][name]["state"] for name in ("line", "gps", "plc")} == {
        "line": "finished",
        "gps": "finished",
        "plc": "finished",
    }
    messages = [e["msg"] for e in log_events(rig.log)]
    assert "stopped cleanly" in messages
    assert not [e for e in log_events(rig.log) if e["level"] in ("error", "critical")]
    wal = rig.data / "journal.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert status_json(rig.config)["daemon"]["running"] is False
