"""The Modbus TCP source: polls holding and input registers on a steady cadence, reading them
in as few requests as it can, and decodes each into a scaled channel value.

Error categories: no answer within `timeout` or a lost connection is transient (the base's
jittered backoff reconnects); a Modbus exception response that says the request is wrong for
this device (illegal function, address or value) is a configuration problem of the register it
names: reported once as `malformed` and the register left out until the next connection; any
other exception response (device busy, gateway without answer, ...) costs that poll the values
of the registers it covered (`device_error`) and they are asked for again the next poll. A
device that refuses every configured register leaves nothing to poll: the source says so in
`health.error` and retries with the base's backoff rather than polling nothing.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from config.sensors import ModbusRegister, ModbusSensor
from sensors.base import SourceError, utc_now
from sensors.live import LiveSource

RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32"]
Order = Literal["big", "little"]
Table = Literal["holding", "input"]

# The Modbus limit for one read of holding or input registers (function codes 3 and 4).
MAX_READ_COUNT = 125
# Reading a few registers nobody asked for costs 2 bytes each; another request costs a round
# trip. Devices that refuse such filler registers are handled by narrowing the read.
MAX_GAP = 8
REGISTER_WIDTH: dict[RegisterType, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
}
_STRUCT_FORMAT: dict[RegisterType, str] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
}
# Exception codes that say the request itself does not fit the device: asking again cannot help.
CONFIGURATION_ERRORS = frozenset(
    {ExcCodes.ILLEGAL_FUNCTION, ExcCodes.ILLEGAL_ADDRESS, ExcCodes.ILLEGAL_VALUE}
)


def decode_registers(
    words: Sequence[int],
    kind: RegisterType,
    *,
    byte_order: Order = "big",
    word_order: Order = "big",
) -> int | float:
    """The number held in `words` (16-bit registers as received, first register first).

    `word_order` big: the first register holds the high word of a 32-bit value; `byte_order`
    little: the two bytes of each register are swapped against the Modbus (big-endian) order.
    """
    width = REGISTER_WIDTH[kind]
    if len(words) != width:
        raise ValueError(f"{kind} needs {width} register(s), got {len(words)}")
    for word in words:
        if not 0 <= word <= 0xFFFF:
            raise ValueError(f"register value {word} is not a 16-bit word")
    ordered = list(words) if word_order == "big" else list(reversed(words))
    data = b"".join(
        word.to_bytes(2, "big" if byte_order == "big" else "little") for word in ordered
    )
    value: int | float = struct.unpack(_STRUCT_FORMAT[kind], data)[0]
    return value


def register_value(register: ModbusRegister, words: Sequence[int]) -> float:
    """The channel value of `register`: its decoded raw number * scale + offset."""
    raw = decode_registers(
        words, register.type, byte_order=register.byte_order, word_order=register.word_order
    )
    return raw * register.scale + register.offset


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: `count` registers of `table` from `address`, covering `registers`."""

    table: Table
    address: int
    count: int
    registers: tuple[ModbusRegister, ...]

    @property
    def has_filler(self) -> bool:
        """Whether the read takes registers no configured register needs (gaps)."""
        needed: set[int] = set()
        for register in self.registers:
            needed.update(range(register.address, _end(register)))
        return len(needed) < self.count

    def describe(self) -> str:
        last = self.address + self.count - 1
        span = f"{self.address}" if self.count == 1 else f"{self.address}..{last}"
        return f"{self.table} register {span}"


def _end(register: ModbusRegister) -> int:
    return register.address + REGISTER_WIDTH[register.type]


def plan_reads(
    registers: Iterable[ModbusRegister],
    *,
    max_gap: int = MAX_GAP,
    max_count: int = MAX_READ_COUNT,
) -> list[ReadBlock]:
    """The fewest reads covering `registers`: registers of one table at most `max_gap` apart
    share a read of at most `max_count` registers. Holding tables first, then by address."""
    blocks: list[ReadBlock] = []
    for table in ("holding", "input"):
        ordered = sorted(
            (r for r in registers if r.table == table), key=lambda r: (r.address, _end(r))
        )
        start = end = 0
        members: list[ModbusRegister] = []
        for register in ordered:
            if members and (
                register.address - end > max_gap or max(end, _end(register)) - start > max_count
            ):
                blocks.append(ReadBlock(table, start, end - start, tuple(members)))
                members = []
            if not members:
                start, end = register.address, _end(register)
            end = max(end, _end(register))
            members.append(register)
        if members:
            blocks.append(ReadBlock(table, start, end - start, tuple(members)))
    return blocks


def _narrowed(block: ReadBlock) -> list[ReadBlock]:
    """Smaller reads to find out which register a refused read was refused for: first without
    filler registers, then one read per register."""
    if block.has_filler:
        return plan_reads(block.registers, max_gap=0)
    return [
        ReadBlock(block.table, register.address, REGISTER_WIDTH[register.type], (register,))
        for register in block.registers
    ]


def _exception_name(code: int) -> str:
    try:
        return ExcCodes(code).name
    except ValueError:
        return f"UNKNOWN_EXCEPTION_{code}"


def _check_registers(cfg: ModbusSensor) -> None:
    """Register lists a device can never satisfy, named before anything connects."""
    seen: set[str] = set()
    for register in cfg.registers:
        if register.channel in seen:
            raise ValueError(
                f"modbus source {cfg.name!r}: channel {register.channel!r} is configured twice"
            )
        seen.add(register.channel)
        if _end(register) > 0x10000:
            raise ValueError(
                f"modbus source {cfg.name!r}: {register.channel} ({register.type}) at "
                f"{register.address} runs past the last register address 65535"
            )


class ModbusSource(LiveSource):
    """Registers polled every `cfg.poll` seconds from a Modbus TCP device; one poll is one
    sample column. `health.extra`: `polls` (completed), `failed_polls` (ended by a timeout or
    a lost connection) and `poll_ms` (round trip of the last completed poll)."""

    # pymodbus signals a request without answer with ModbusIOException and a missing link with
    # ConnectionException; both are worth a reconnect.
    transient = (ModbusIOException, ConnectionException)

    def __init__(self, cfg: ModbusSensor) -> None:
        _check_registers(cfg)
        super().__init__(cfg, [register.channel for register in cfg.registers])
        self.cfg = cfg
        self._full_plan = plan_reads(cfg.registers)
        self._plan = list(self._full_plan)
        self.health.extra.update({"polls": 0.0, "failed_polls": 0.0, "poll_ms": 0.0})

    @property
    def requests_per_poll(self) -> int:
        """Reads one poll makes now (fewer registers left out means fewer, larger reads)."""
        return len(self._plan)

    @property
    def _peer(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    async def _session(self) -> None:
        link_lost = asyncio.Event()

        def on_link(up: bool) -> None:
            if not up:
                link_lost.set()

        # pymodbus' own retries and reconnects are off: the base's backoff decides when to try
        # again, so health says what the link really does.
        client = AsyncModbusTcpClient(
            self.cfg.host,
            port=self.cfg.port,
            name=f"modbus:{self.name}",
            timeout=self.cfg.timeout,
            retries=0,
            reconnect_delay=0,
            trace_connect=on_link,
        )
        try:
            if not await client.connect():
                raise SourceError(
                    self.name,
                    f"cannot connect to {self._peer} (refused, unreachable or no answer "
                    f"within {self.cfg.timeout:g} s)",
                    retryable=True,
                )
            self._connected()
            # A new connection may be a reconfigured device: registers refused before are
            # asked for again.
            self._plan = list(self._full_plan)
            await self._poll_forever(client, link_lost)
        finally:
            client.close()

    async def _poll_forever(self, client: AsyncModbusTcpClient, link_lost: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            started = loop.time()
            ts = utc_now()
            try:
                values = await self._poll(client, link_lost)
            except Exception:
                self.health.extra["failed_polls"] += 1
                raise
            self.health.extra["polls"] += 1
            self.health.extra["poll_ms"] = (loop.time() - started) * 1000
            if values:
                self._publish(values, ts)
            if not self._plan:
                raise SourceError(
                    self.name,
                    f"{self._peer} refused every configured register; see the quality reports",
                    retryable=True,
                )
            # The cadence follows the clock, not the request time; a poll that overran its slot
            # skips the slots it missed instead of firing a burst to catch up.
            due += self.cfg.poll
            now = loop.time()
            if due < now:
                due += math.ceil((now - due) / self.cfg.poll) * self.cfg.poll
            try:
                async with asyncio.timeout(due - now):
                    await link_lost.wait()
            except TimeoutError:
                continue
            raise SourceError(self.name, f"{self._peer} closed the connection", retryable=True)

    async def _poll(
        self, client: AsyncModbusTcpClient, link_lost: asyncio.Event
    ) -> dict[str, float]:
        values: dict[str, float] = {}
        plan: list[ReadBlock] = []
        for block in self._plan:
            plan += await self._read(client, link_lost, block, values)
        self._plan = plan
        return values

    async def _read(
        self,
        client: AsyncModbusTcpClient,
        link_lost: asyncio.Event,
        block: ReadBlock,
        values: dict[str, float],
    ) -> list[ReadBlock]:
        """Read `block` into `values`; return the reads that replace it in the plan."""
        response = await self._request(client, link_lost, block)
        if not response.isError():
            self._decode(block, response.registers, values)
            return [block]
        code = response.exception_code
        if code not in CONFIGURATION_ERRORS:
            self.quality.add(
                "device_error",
                f"{block.describe()} answered {_exception_name(code)} (exception code {code})",
            )
            return [block]
        if len(block.registers) > 1:
            kept: list[ReadBlock] = []
            for narrower in _narrowed(block):
                kept += await self._read(client, link_lost, narrower, values)
            return kept
        register = block.registers[0]
        self.quality.add(
            "malformed",
            f"{register.channel}: {block.describe()} ({register.type}) answered "
            f"{_exception_name(code)} (exception code {code}); not polled until reconnect",
        )
        return []

    async def _request(
        self, client: AsyncModbusTcpClient, link_lost: asyncio.Event, block: ReadBlock
    ) -> ModbusPDU:
        if link_lost.is_set() or not client.connected:
            # Asking pymodbus now would make it reconnect on its own; the base does that.
            raise SourceError(self.name, f"{self._peer} closed the connection", retryable=True)
        read = (
            client.read_holding_registers
            if block.table == "holding"
            else client.read_input_registers
        )
        request = asyncio.ensure_future(
            read(block.address, count=block.count, device_id=self.cfg.unit)
        )
        lost = asyncio.ensure_future(link_lost.wait())
        try:
            # pymodbus notices a dropped connection but lets the pending request run into its
            # timeout; racing the two reports the loss at once.
            await asyncio.wait({request, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (request, lost):
                task.cancel()
            await asyncio.gather(request, lost, return_exceptions=True)
        if request.cancelled():
            raise SourceError(
                self.name,
                f"{self._peer} closed the connection during a read of {block.describe()}",
                retryable=True,
            )
        try:
            return request.result()
        except ModbusIOException as exc:
            raise SourceError(
                self.name,
                f"no valid answer from {self._peer} within {self.cfg.timeout:g} s to a read of "
                f"{block.describe()} ({exc})",
                retryable=True,
            ) from exc

    def _decode(self, block: ReadBlock, words: Sequence[int], values: dict[str, float]) -> None:
        if len(words) < block.count:
            self.quality.add(
                "malformed",
                f"{block.describe()}: the device sent {len(words)} of {block.count} registers",
            )
            return
        for register in block.registers:
            start = register.address - block.address
            words_of = words[start : start + REGISTER_WIDTH[register.type]]
            values[register.channel] = register_value(register, words_of)
