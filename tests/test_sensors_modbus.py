"""Tests of sensors.modbus: register decoding, read planning, and the source against a real
pymodbus TCP server on 127.0.0.1 (values, refused registers, busy device, timeouts, cadence,
reconnects)."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import statistics
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import suppress
from itertools import pairwise
from typing import Any

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from config.sensors import ModbusRegister, ModbusSensor
from sensors.base import QualityReport, SampleWindow
from sensors.modbus import (
    MAX_GAP,
    ModbusSource,
    ReadBlock,
    decode_registers,
    plan_reads,
    register_value,
)

# Not pymodbus' default of 1: a source that ignored `unit` would get no values from the device.
UNIT = 3
READ_HOLDING, READ_INPUT = 3, 4


# --- decoding --------------------------------------------------------------------------------

# Word patterns written out by hand from the IEEE 754 / two's complement bit patterns:
# 1.5 = 0x3FC00000, -2 = 0xFFFFFFFE, 0x12345678; "byte little" swaps the bytes of each register.
FLOAT_1_5 = {
    ("big", "big"): [0x3FC0, 0x0000],
    ("big", "little"): [0x0000, 0x3FC0],
    ("little", "big"): [0xC03F, 0x0000],
    ("little", "little"): [0x0000, 0xC03F],
}
INT32_MINUS_2 = {
    ("big", "big"): [0xFFFF, 0xFFFE],
    ("big", "little"): [0xFFFE, 0xFFFF],
    ("little", "big"): [0xFFFF, 0xFEFF],
    ("little", "little"): [0xFEFF, 0xFFFF],
}
UINT32_0X12345678 = {
    ("big", "big"): [0x1234, 0x5678],
    ("big", "little"): [0x5678, 0x1234],
    ("little", "big"): [0x3412, 0x7856],
    ("little", "little"): [0x7856, 0x3412],
}
ORDERS = list(FLOAT_1_5)


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS)
def test_float32_in_every_order(byte_order: Any, word_order: Any) -> None:
    words = FLOAT_1_5[byte_order, word_order]
    value = decode_registers(words, "float32", byte_order=byte_order, word_order=word_order)
    assert value == 1.5


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS)
def test_int32_in_every_order(byte_order: Any, word_order: Any) -> None:
    words = INT32_MINUS_2[byte_order, word_order]
    assert decode_registers(words, "int32", byte_order=byte_order, word_order=word_order) == -2
    # The same bits unsigned: the sign is the type's business, not the order's.
    unsigned = decode_registers(words, "uint32", byte_order=byte_order, word_order=word_order)
    assert unsigned == 0xFFFFFFFE


@pytest.mark.parametrize(("byte_order", "word_order"), ORDERS)
def test_uint32_in_every_order(byte_order: Any, word_order: Any) -> None:
    words = UINT32_0X12345678[byte_order, word_order]
    value = decode_registers(words, "uint32", byte_order=byte_order, word_order=word_order)
    assert value == 0x12345678


def test_sixteen_bit_types() -> None:
    assert decode_registers([0xFFFE], "int16") == -2
    assert decode_registers([0xFFFE], "uint16") == 65534
    assert decode_registers([0x8000], "int16") == -32768
    assert decode_registers([0x0102], "uint16") == 0x0102
    assert decode_registers([0x0102], "uint16", byte_order="little") == 0x0201
    assert decode_registers([0xFEFF], "int16", byte_order="little") == -2
    # Word order means nothing for one register.
    assert decode_registers([0x0102], "uint16", word_order="little") == 0x0102


def test_float32_nan_pattern_decodes_to_nan() -> None:
    assert math.isnan(decode_registers([0x7FC0, 0x0000], "float32"))


@pytest.mark.parametrize(
    ("words", "kind", "message"),
    [
        ([1], "float32", "float32 needs 2 register"),
        ([1, 2], "int16", "int16 needs 1 register"),
        ([0x10000], "uint16", "65536 is not a 16-bit word"),
        ([-1, 0], "int32", "-1 is not a 16-bit word"),
    ],
)
def test_decode_rejects_wrong_input(words: list[int], kind: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_registers(words, kind)


def test_register_value_scales_and_offsets() -> None:
    register = ModbusRegister.model_validate(
        {"channel": "t", "address": 0, "type": "int16", "scale": 0.1, "offset": -40}
    )
    assert register_value(register, [0xFFFE]) == pytest.approx(-40.2)
    swapped = ModbusRegister.model_validate(
        {"channel": "f", "address": 0, "type": "float32", "word_order": "little", "scale": 2}
    )
    assert register_value(swapped, [0x0000, 0x3FC0]) == 3.0


# --- read planning ---------------------------------------------------------------------------


def _reg(channel: str, address: int, kind: str = "uint16", table: str = "holding") -> Any:
    return ModbusRegister.model_validate(
        {"channel": channel, "address": address, "type": kind, "table": table}
    )


def _spans(blocks: list[ReadBlock]) -> list[tuple[str, int, int]]:
    return [(b.table, b.address, b.count) for b in blocks]


def test_plan_groups_contiguous_and_near_registers_per_table() -> None:
    registers = [
        _reg("c", 12, "float32"),
        _reg("a", 10),
        _reg("b", 11),
        _reg("i0", 0, table="input"),
        _reg("i1", 1, "int32", table="input"),
        _reg("near", 14 + MAX_GAP),  # MAX_GAP unneeded registers after c: still one read
        _reg("far", 16 + 2 * MAX_GAP),  # one more than MAX_GAP after near: a new read
    ]
    blocks = plan_reads(registers)
    assert _spans(blocks) == [
        ("holding", 10, 5 + MAX_GAP),
        ("holding", 16 + 2 * MAX_GAP, 1),
        ("input", 0, 3),
    ]
    assert [r.channel for r in blocks[0].registers] == ["a", "b", "c", "near"]
    assert blocks[0].has_filler
    assert not blocks[2].has_filler


def test_plan_never_reads_more_than_125_registers() -> None:
    registers = [_reg(f"r{i}", i) for i in range(123)]
    registers.append(_reg("straddles", 124, "uint32"))  # 124..125: would make 126
    registers += [_reg(f"s{i}", 126 + i) for i in range(130)]
    blocks = plan_reads(registers)
    assert all(b.count <= 125 for b in blocks)
    assert _spans(blocks) == [("holding", 0, 123), ("holding", 124, 125), ("holding", 249, 7)]
    covered = [r.channel for b in blocks for r in b.registers]
    assert sorted(covered) == sorted(r.channel for r in registers)


def test_plan_without_gaps_and_with_overlaps() -> None:
    registers = [_reg("wide", 5, "int32"), _reg("low_word", 6), _reg("next", 8)]
    assert _spans(plan_reads(registers)) == [("holding", 5, 4)]
    assert _spans(plan_reads(registers, max_gap=0)) == [("holding", 5, 2), ("holding", 8, 1)]


def _cfg(port: int, registers: list[dict[str, Any]], **overrides: Any) -> ModbusSensor:
    raw: dict[str, Any] = {
        "name": "plc",
        "type": "modbus",
        "host": "127.0.0.1",
        "port": port,
        "unit": UNIT,
        "poll": 0.05,
        "timeout": 0.5,
        "window": 0.2,
        "reconnect_max": 0.5,
        "registers": registers,
    }
    raw.update(overrides)
    return ModbusSensor.model_validate(raw)


@pytest.mark.parametrize(
    ("registers", "message"),
    [
        (
            [{"channel": "a", "address": 0}, {"channel": "a", "address": 1}],
            "channel 'a' is configured twice",
        ),
        (
            [{"channel": "last", "address": 65535, "type": "float32"}],
            "last \\(float32\\) at 65535 runs past the last register address",
        ),
    ],
)
def test_impossible_register_lists_are_refused_by_name(
    registers: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ModbusSource(_cfg(502, registers))


# --- a real Modbus TCP device ----------------------------------------------------------------


class Device:
    """A pymodbus TCP server on 127.0.0.1 holding the given registers (address: word); any
    other address is invalid and answered ILLEGAL_ADDRESS. Records every request it receives;
    `delay_s` holds each answer back, `refuse_with` answers every request with that code."""

    def __init__(self, holding: Mapping[int, int], inputs: Mapping[int, int]) -> None:
        self.holding = dict(holding)
        self.inputs = dict(inputs)
        self.requests: list[tuple[int, int, int]] = []
        self.delay_s = 0.0
        self.refuse_with: ExcCodes | None = None
        self._server: ModbusTcpServer | None = None

    async def start(self, port: int = 0) -> int:
        def blocks(words: Mapping[int, int]) -> list[SimData]:
            return [
                SimData(address, values=[word], datatype=DataType.REGISTERS)
                for address, word in sorted(words.items())
            ]

        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        device = SimDevice(
            id=UNIT,
            simdata=(bits, list(bits), blocks(self.holding), blocks(self.inputs)),
            action=self._action,
        )
        self._server = ModbusTcpServer(device, address=("127.0.0.1", port), trace_pdu=self._trace)
        await self._server.serve_forever(background=True)
        listening: Any = self._server.transport
        return int(listening.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]  # unannotated upstream
            self._server = None

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests.append((pdu.function_code, pdu.address, pdu.count))
        return pdu

    async def _action(self, *_args: Any) -> ExcCodes | None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.refuse_with


@pytest.fixture
async def device_factory() -> AsyncIterator[Callable[..., Device]]:
    devices: list[Device] = []

    def make(holding: Mapping[int, int], inputs: Mapping[int, int] | None = None) -> Device:
        devices.append(Device(holding, inputs or {0: 0}))
        return devices[-1]

    yield make
    for device in devices:
        await device.stop()


class Reader:
    """Iterates a source in a task, keeping what it yields, as the daemon would."""

    def __init__(self, source: ModbusSource) -> None:
        self.source = source
        self.windows: list[SampleWindow] = []
        self.reports: list[QualityReport] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.source:
            async for reading in self.source.readings():
                if isinstance(reading, SampleWindow):
                    self.windows.append(reading)
                else:
                    self.reports.append(reading)

    def values(self, channel: str, since: int = 0) -> list[float]:
        out: list[float] = []
        for window in self.windows[since:]:
            row = window.values[window.channels.index(channel)]
            out += [float(v) for v in row if not math.isnan(v)]
        return out

    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for report in self.reports:
            for reason, count in report.counts.items():
                total[reason] = total.get(reason, 0) + count
        return total

    async def close(self) -> None:
        self.task.cancel()
        with suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def reader_of() -> AsyncIterator[Callable[[ModbusSource], Reader]]:
    readers: list[Reader] = []

    def make(source: ModbusSource) -> Reader:
        readers.append(Reader(source))
        return readers[-1]

    yield make
    for reader in readers:
        await reader.close()


async def until(predicate: Callable[[], object], what: str, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Holding registers: every type and order; the zeros between them (3..9, 18..19, 30..31) are
# filler nobody asked for, read along.
HOLDING = {
    **dict.fromkeys(range(33), 0),
    0: 0xFFFE,  # int16 -2
    1: 0xFFFE,  # uint16 65534
    2: 0xFEFF,  # int16 -2, bytes swapped
    **{10 + 2 * i + k: w for i, o in enumerate(ORDERS) for k, w in enumerate(FLOAT_1_5[o])},
    **{20 + 2 * i + k: w for i, o in enumerate(ORDERS) for k, w in enumerate(INT32_MINUS_2[o])},
    28: 0x1234,
    29: 0x5678,
    32: 0x0064,  # 100
}
INPUTS = {0: 0x5678, 1: 0x1234, 2: 0x00C8}  # uint32 0x12345678 word-swapped; 200


def _every_type_registers() -> tuple[list[dict[str, Any]], dict[str, float]]:
    registers: list[dict[str, Any]] = [
        {"channel": "i16", "address": 0, "type": "int16", "scale": 0.5, "offset": 10},
        {"channel": "u16", "address": 1, "type": "uint16", "scale": 0.5, "offset": 1},
        {"channel": "i16_swapped", "address": 2, "type": "int16", "byte_order": "little"},
        {"channel": "u32", "address": 28, "type": "uint32", "scale": 2},
        {"channel": "after_filler", "address": 32, "scale": 0.01},
        {
            "channel": "in_u32",
            "address": 0,
            "table": "input",
            "type": "uint32",
            "word_order": "little",
        },
        {"channel": "in_u16", "address": 2, "table": "input", "offset": -200},
    ]
    expected = {
        "i16": 9.0,
        "u16": 32768.0,
        "i16_swapped": -2.0,
        "u32": 2.0 * 0x12345678,
        "after_filler": 1.0,
        "in_u32": float(0x12345678),
        "in_u16": 0.0,
    }
    for i, (byte_order, word_order) in enumerate(ORDERS):
        tag = f"{byte_order[0]}{word_order[0]}"
        registers.append(
            {
                "channel": f"f32_{tag}",
                "address": 10 + 2 * i,
                "type": "float32",
                "byte_order": byte_order,
                "word_order": word_order,
                "scale": 10,
                "offset": 0.25,
            }
        )
        expected[f"f32_{tag}"] = 15.25
        registers.append(
            {
                "channel": f"i32_{tag}",
                "address": 20 + 2 * i,
                "type": "int32",
                "byte_order": byte_order,
                "word_order": word_order,
                "scale": -3,
            }
        )
        expected[f"i32_{tag}"] = 6.0
    return registers, expected


async def test_every_type_and_order_flows_scaled_in_two_reads(
    device_factory: Callable[..., Device], reader_of: Callable[[ModbusSource], Reader]
) -> None:
    device = device_factory(HOLDING, INPUTS)
    port = await device.start()
    registers, expected = _every_type_registers()
    source = ModbusSource(_cfg(port, registers))
    reader = reader_of(source)
    await until(lambda: len(reader.windows) >= 2, "two windows")

    assert reader.windows[0].channels == tuple(r["channel"] for r in registers)
    for channel, value in expected.items():
        seen = reader.values(channel)
        assert seen, f"no value for {channel}"
        assert seen == pytest.approx([value] * len(seen)), channel
    assert reader.reports == []
    # One read per table covers everything, filler included.
    assert set(device.requests) == {(READ_HOLDING, 0, 33), (READ_INPUT, 0, 3)}
    assert source.requests_per_poll == 2
    # Every window column is one poll: all channels present in each.
    window = reader.windows[1]
    assert window.times_s is not None
    assert not any(math.isnan(v) for v in window.values.flatten())
    assert source.health.state == "running"
    assert source.health.extra["polls"] >= window.values.shape[1]
    assert source.health.extra["failed_polls"] == 0
    assert 0 < source.health.extra["poll_ms"] < 500


async def test_illegal_address_is_reported_once_and_the_others_keep_flowing(
    device_factory: Callable[..., Device], reader_of: Callable[[ModbusSource], Reader]
) -> None:
    # 3 and 4 do not exist on the device; 2 and 4 are filler the planned read takes along.
    device = device_factory({0: 11, 1: 12, 2: 0, 5: 15})
    port = await device.start()
    registers = [
        {"channel": "a", "address": 0},
        {"channel": "b", "address": 1},
        {"channel": "missing", "address": 3},
        {"channel": "c", "address": 5},
    ]
    source = ModbusSource(_cfg(port, registers))
    reader = reader_of(source)
    await until(lambda: len(reader.windows) >= 4 and reader.reports, "windows and a report")

    assert reader.counts() == {"malformed": 1}
    (issue,) = reader.reports[0].examples
    assert issue.reason == "malformed"
    assert "missing" in issue.detail
    assert "holding register 3" in issue.detail
    assert "ILLEGAL_ADDRESS" in issue.detail
    assert reader.values("a") and set(reader.values("a")) == {11.0}
    assert set(reader.values("b")) == {12.0}
    assert set(reader.values("c")) == {15.0}
    assert reader.values("missing") == []
    # After narrowing once, polls ask only for what exists, in as few reads as that allows.
    assert source.requests_per_poll == 2
    steady = set(device.requests[-6:])
    assert steady == {(READ_HOLDING, 0, 2), (READ_HOLDING, 5, 1)}
    assert source.health.state == "running"
    assert source.health.reconnects == 0


async def test_a_busy_device_costs_values_but_not_the_register(
    device_factory: Callable[..., Device], reader_of: Callable[[ModbusSource], Reader]
) -> None:
    device = device_factory({0: 7})
    port = await device.start()
    source = ModbusSource(_cfg(port, [{"channel": "a", "address": 0}]))
    reader = reader_of(source)
    await until(lambda: reader.values("a"), "a first value")
    device.refuse_with = ExcCodes.DEVICE_BUSY
    await until(lambda: reader.counts().get("device_error", 0) >= 3, "device_error reports")
    device.refuse_with = None
    before = len(reader.windows)
    await until(lambda: reader.values("a", since=before + 1), "values after the busy spell")

    assert "malformed" not in reader.counts()
    example = next(i for r in reader.reports for i in r.examples if i.reason == "device_error")
    assert "holding register 0" in example.detail
    assert "DEVICE_BUSY" in example.detail
    assert source.requests_per_poll == 1
    assert source.health.reconnects == 0


async def test_only_refused_registers_keep_the_source_retrying_visibly(
    device_factory: Callable[..., Device], reader_of: Callable[[ModbusSource], Reader]
) -> None:
    device = device_factory({0: 1})
    port = await device.start()
    source = ModbusSource(_cfg(port, [{"channel": "nowhere", "address": 40}]))
    reader = reader_of(source)
    await until(lambda: source.health.state == "reconnecting", "reconnecting")
    await until(lambda: reader.reports, "a quality report")

    assert "refused every configured register" in (source.health.error or "")
    assert reader.counts().get("malformed", 0) >= 1
    assert not reader.task.done()


async def test_server_restart_reconnects_and_values_flow_again(
    device_factory: Callable[..., Device], reader_of: Callable[[ModbusSource], Reader]
) -> None:
    first = device_factory({0: 100})
    port = await first.start()
    source = ModbusSource(_cfg(port, [{"channel": "a", "address": 0}]))
    reader = reader_of(source)
    await until(lambda: reader.values("a"), "a first value")
    assert source.health.state == "running"

    await first.stop()
    await until(lambda: source.health.state == "reconnecting", "reconnecting", within=2)
    assert source.health.error
    assert source.health.reconnects == 0

    second = device_factory({0: 200})
    await second.start(port)
    await until(lambda: 200.0 in reader.values("a"), "values from the restarted device")
    assert source.health.state == "running"
    assert source.health.error is None
    assert source.health.reconnects == 1
    assert set(reader.values("a")) == {100.0, 200.0}
    assert not reader.task.done()


async def test_connection_lost_during_a_read_is_noticed_at_once(
    device_factory: Callable[..., Device], reader_of: Callable[[ModbusSource], Reader]
) -> None:
    device = device_factory({0: 1})
    port = await device.start()
    # A long timeout: noticing the loss must not wait for it.
    source = ModbusSource(_cfg(port, [{"channel": "a", "address": 0}], timeout=5))
    reader = reader_of(source)
    await until(lambda: reader.values("a"), "a first value")
    device.delay_s = 1.0
    asked = len(device.requests)
    await until(lambda: len(device.requests) > asked, "a read the device holds back")
    await device.stop()
    await until(lambda: source.health.state == "reconnecting", "reconnecting", within=1)
    assert "closed the connection during a read of holding register 0" in (
        source.health.error or ""
    )
    assert source.health.extra["failed_polls"] == 1


async def test_refused_connection_keeps_reconnecting_without_crashing(
    device_factory: Callable[..., Device],
    reader_of: Callable[[ModbusSource], Reader],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = _free_port()
    source = ModbusSource(_cfg(port, [{"channel": "a", "address": 0}]))
    with caplog.at_level(logging.WARNING, logger="sensors.live"):
        reader = reader_of(source)
        await until(lambda: source.health.state == "reconnecting", "reconnecting")
        await until(
            lambda: sum("reconnecting in" in r.getMessage() for r in caplog.records) >= 3,
            "three connection attempts",
        )
    assert f"cannot connect to 127.0.0.1:{port}" in (source.health.error or "")
    assert source.health.reconnects == 0
    assert not reader.task.done()
    assert reader.windows == []

    # The device turning up later is simply the first connection.
    device = device_factory({0: 5})
    await device.start(port)
    await until(lambda: reader.values("a"), "values once the device is there")
    assert source.health.state == "running"
    assert source.health.reconnects == 0


async def test_no_answer_in_time_is_a_failed_poll_and_a_reconnect(
    device_factory: Callable[..., Device], reader_of: Callable[[ModbusSource], Reader]
) -> None:
    device = device_factory({0: 9})
    port = await device.start()
    source = ModbusSource(_cfg(port, [{"channel": "a", "address": 0}], timeout=0.15))
    reader = reader_of(source)
    await until(lambda: reader.values("a"), "a first value")
    device.delay_s = 0.6
    await until(lambda: source.health.state == "reconnecting", "reconnecting")
    assert "no valid answer from" in (source.health.error or "")
    assert "within 0.15 s" in (source.health.error or "")
    assert source.health.extra["failed_polls"] >= 1

    device.delay_s = 0.0
    await until(lambda: source.health.reconnects >= 1, "a reconnect")
    before = len(reader.windows)
    await until(lambda: reader.values("a", since=before + 1), "values after the reconnect")
    assert source.health.state == "running"


async def test_polls_keep_the_cadence_when_requests_take_time(
    device_factory: Callable[..., Device], reader_of: Callable[[ModbusSource], Reader]
) -> None:
    device = device_factory({0: 1}, {0: 2})
    port = await device.start()
    device.delay_s = 0.02  # per read: two reads a poll take 0.04 of the 0.05 s period
    registers = [{"channel": "h", "address": 0}, {"channel": "i", "address": 0, "table": "input"}]
    source = ModbusSource(_cfg(port, registers))
    reader = reader_of(source)
    await until(lambda: len(reader.windows) >= 5, "five windows")

    times: list[float] = []
    for window in reader.windows:
        assert window.times_s is not None
        times += [window.ts.timestamp() + float(t) for t in window.times_s]
    intervals = [b - a for a, b in pairwise(times)]
    # Sleeping the period after each poll would space them 0.09 s apart.
    assert statistics.median(intervals) == pytest.approx(0.05, abs=0.012)
    assert source.health.extra["poll_ms"] >= 40
