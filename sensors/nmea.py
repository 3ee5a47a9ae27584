"""The NMEA 0183 source: the sentence parser and decoders, the last known position, and
`NmeaSource`, which reads sentences from a serial port, UDP datagrams or a TCP stream.

The parser is pure (`parse_sentence`); the source adds the transports, talker filtering and the
data-quality counts. Bad sentences are never exceptions past the source: they are counted as
`malformed` or `bad_checksum` in the source's quality reports.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal, NamedTuple

import serial  # type: ignore[import-untyped]
import serial_asyncio  # type: ignore[import-untyped]

from config.names import NAME_RE

# Every channel the decoders produce, except the dynamic `xdr.<name>` ones, and their naming of
# XDR transducers: the config's, which checks limits and features on NMEA sources against them.
from config.sensors import NMEA_CHANNELS as NMEA_CHANNELS
from config.sensors import NmeaSensor
from config.sensors import xdr_channel as xdr_channel
from sensors.base import SourceError, utc_now
from sensors.live import LiveSource

XDR_PREFIX = "xdr."
MAX_XDR_CHANNELS = 64
CHANNEL_NAME = NAME_RE  # a channel is named like everything else (config.names)
# NMEA 0183 allows 82 characters a sentence; proprietary sentences and tag blocks run longer, but
# a line past this is noise (or a peer that never sends a newline) and must not grow a buffer.
MAX_LINE_BYTES = 1024
READ_CHUNK_BYTES = 4096
# A TCP connect to a host that is gone hangs for minutes by default; fail and back off instead.
CONNECT_TIMEOUT_S = 10.0
EXCERPT_CHARS = 90

HEALTH_COUNTERS = ("sentences", "no_checksum", "unsupported", "other_talker", "xdr_unlisted")
"""Counters in `health.extra`: sentences accepted, those without a checksum, accepted sentences
of a type no decoder knows, sentences dropped by the talker filter, XDR values whose transducer
is not one of the source's channels."""

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_COORDINATE = re.compile(r"(\d+)(\d\d(?:\.\d*)?)")
_UTC_TIME = re.compile(r"(\d\d)(\d\d)(\d\d(?:\.\d+)?)")
_UTC_DATE = re.compile(r"(\d\d)(\d\d)(\d\d)")
_CHECKSUM = re.compile(r"[0-9A-Fa-f]{2}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_ADDRESS = re.compile(r"[A-Z][A-Z0-9]{2,9}")

KNOT_M_S = 1852.0 / 3600.0
WIND_SPEED_TO_M_S = {"N": KNOT_M_S, "M": 1.0, "K": 1.0 / 3.6, "S": 0.44704}

NmeaReason = Literal["malformed", "bad_checksum"]


class NmeaError(ValueError):
    """A line that is not a usable NMEA sentence; `reason` is the data-quality reason."""

    def __init__(self, reason: NmeaReason, detail: str) -> None:
        self.reason: NmeaReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class _FieldError(ValueError):
    """A field a decoder cannot use; `parse_sentence` turns it into a `malformed` NmeaError."""


@dataclass(frozen=True, slots=True)
class NmeaSentence:
    """One parsed sentence. `values` is empty for types no decoder knows (and for sentences that
    carry no valid data, e.g. RMC with status V); `utc_time` and `utc_date` are the fix time
    fields of GGA and RMC."""

    talker: str  # "GP", "II", ...; "P" for proprietary sentences
    sentence_type: str  # "GGA", "RMC", ...; for proprietary ones the maker and type ("GRME")
    fields: tuple[str, ...]  # the data fields after the address, checksum removed
    has_checksum: bool
    values: Mapping[str, float] = field(default_factory=dict)
    utc_time: time | None = None
    utc_date: date | None = None


def nmea_checksum(body: str) -> int:
    """XOR of every character between the leading $ or ! and the *."""
    result = 0
    for char in body:
        result ^= ord(char)
    return result


def parse_sentence(line: str) -> NmeaSentence:
    """Parse one sentence (`$GPGGA,...*47`, trailing CR/LF allowed) and decode its values.

    Raises `NmeaError`: `bad_checksum` when a checksum is present and wrong, `malformed` for
    anything else that is not a sentence (no leading $ or !, a bad address, too few fields for
    its type, a number or indicator that does not parse). A sentence without a checksum and one
    of an unknown type are not errors.
    """
    text = line.strip()
    excerpt = _excerpt(text)
    if not text or text[0] not in "$!":
        raise NmeaError("malformed", f"does not start with $ or !: {excerpt}")
    # Garbage bytes are malformed whether or not a checksum would also catch them.
    if not _PRINTABLE.fullmatch(text):
        raise NmeaError("malformed", f"non-ASCII or control characters: {excerpt}")
    body, star, checksum_text = text[1:].partition("*")
    if star:
        if not _CHECKSUM.fullmatch(checksum_text):
            raise NmeaError(
                "malformed", f"checksum {checksum_text!r} is not two hex digits: {excerpt}"
            )
        found, expected = int(checksum_text, 16), nmea_checksum(body)
        if found != expected:
            raise NmeaError(
                "bad_checksum", f"expected checksum {expected:02X}, found {found:02X}: {excerpt}"
            )
    address, *fields = body.split(",")
    if not _ADDRESS.fullmatch(address):
        raise NmeaError(
            "malformed", f"address {address!r} is not a talker id and a sentence type: {excerpt}"
        )
    talker, sentence_type = (
        ("P", address[1:]) if address.startswith("P") else (address[:2], address[2:])
    )
    decoder = _DECODERS.get(sentence_type) if talker != "P" else None
    decoded = _Decoded({})
    if decoder is not None:
        try:
            decoded = decoder(fields)
        except _FieldError as exc:
            raise NmeaError("malformed", f"{sentence_type}: {exc}: {excerpt}") from None
    return NmeaSentence(
        talker=talker,
        sentence_type=sentence_type,
        fields=tuple(fields),
        has_checksum=bool(star),
        values=decoded.values,
        utc_time=decoded.utc_time,
        utc_date=decoded.utc_date,
    )


def is_supported(sentence: NmeaSentence) -> bool:
    """Whether a decoder knows this sentence's type (an unknown one yields no values)."""
    return sentence.talker != "P" and sentence.sentence_type in _DECODERS


# --------------------------------------------------------------------------------- decoders


class _Decoded(NamedTuple):
    values: dict[str, float]
    utc_time: time | None = None
    utc_date: date | None = None


def _need(fields: Sequence[str], count: int) -> None:
    if len(fields) < count:
        raise _FieldError(f"has {len(fields)} fields, needs at least {count}")


def _number(text: str, what: str) -> float | None:
    """A decimal field; None when it is empty (no value)."""
    if not text:
        return None
    if not _NUMBER.fullmatch(text):
        raise _FieldError(f"{what} {text!r} is not a number")
    return float(text)


def _one_of(text: str, allowed: str, what: str) -> str:
    """A one-letter indicator that must be one of `allowed` (empty is not)."""
    if len(text) != 1 or text not in allowed:
        raise _FieldError(f"{what} is {text!r}, expected {' or '.join(allowed)}")
    return text


def _coordinate(text: str, hemisphere: str, *, latitude: bool) -> float | None:
    """Signed decimal degrees from `ddmm.mmmm` / `dddmm.mmmm` and N/S or E/W (S and W negative)."""
    what = "latitude" if latitude else "longitude"
    if not text:
        return None
    match = _COORDINATE.fullmatch(text)
    if match is None:
        raise _FieldError(f"{what} {text!r} is not (d)ddmm.mmm")
    degrees, minutes = int(match[1]), float(match[2])
    value = degrees + minutes / 60.0
    if minutes >= 60.0 or value > (90.0 if latitude else 180.0):
        raise _FieldError(f"{what} {text!r} is out of range")
    sign = _one_of(hemisphere, "NS" if latitude else "EW", f"{what} hemisphere")
    return -value if sign in "SW" else value


def _utc_time(text: str) -> time | None:
    if not text:
        return None
    match = _UTC_TIME.fullmatch(text)
    if match is None:
        raise _FieldError(f"UTC time {text!r} is not hhmmss(.ss)")
    hours, minutes = int(match[1]), int(match[2])
    whole, _, fraction = match[3].partition(".")
    seconds = int(whole)
    if hours > 23 or minutes > 59 or seconds > 59:
        raise _FieldError(f"UTC time {text!r} is out of range")
    microseconds = int((fraction + "000000")[:6])
    return time(hours, minutes, seconds, microseconds, tzinfo=UTC)


def _utc_date(text: str) -> date | None:
    if not text:
        return None
    match = _UTC_DATE.fullmatch(text)
    if match is None:
        raise _FieldError(f"date {text!r} is not ddmmyy")
    year = int(match[3])
    # Two-digit years: NMEA 0183 predates 2000; receivers in use today report 20xx.
    year += 1900 if year >= 80 else 2000
    try:
        return date(year, int(match[2]), int(match[1]))
    except ValueError:
        raise _FieldError(f"date {text!r} is not a calendar date") from None


def _put(values: dict[str, float], channel: str, value: float | None) -> None:
    if value is not None:
        values[channel] = value


def _decode_gga(f: Sequence[str]) -> _Decoded:
    # time, lat, N/S, lon, E/W, quality, satellites, hdop, altitude, M, geoid, M, age, station
    _need(f, 14)
    fix_time = _utc_time(f[0])
    lat = _coordinate(f[1], f[2], latitude=True)
    lon = _coordinate(f[3], f[4], latitude=False)
    quality = _number(f[5], "fix quality")
    altitude = _number(f[8], "altitude")
    if altitude is not None:
        _one_of(f[9], "M", "altitude unit")
    values: dict[str, float] = {}
    _put(values, "fix_quality", quality)
    _put(values, "satellites", _number(f[6], "satellites"))
    _put(values, "hdop", _number(f[7], "HDOP"))
    if quality:  # 0 is "no fix": whatever position the receiver still prints is not one
        _put(values, "lat", lat)
        _put(values, "lon", lon)
        _put(values, "altitude_m", altitude)
    return _Decoded(values, utc_time=fix_time)


def _decode_rmc(f: Sequence[str]) -> _Decoded:
    # time, status, lat, N/S, lon, E/W, sog, cog, date, magnetic variation, E/W, [mode, [nav status]]
    _need(f, 11)
    fix_time = _utc_time(f[0])
    status = _one_of(f[1], "AV", "status")
    lat = _coordinate(f[2], f[3], latitude=True)
    lon = _coordinate(f[4], f[5], latitude=False)
    sog = _number(f[6], "speed over ground")
    cog = _number(f[7], "course over ground")
    fix_date = _utc_date(f[8])
    mode = f[11] if len(f) > 11 else ""
    values: dict[str, float] = {}
    # V (or NMEA 2.3 mode N): the receiver has no fix, so neither position nor motion is real.
    if status == "A" and mode != "N":
        _put(values, "lat", lat)
        _put(values, "lon", lon)
        _put(values, "sog_kn", sog)
        _put(values, "cog_deg", cog)
    return _Decoded(values, utc_time=fix_time, utc_date=fix_date)


def _decode_vtg(f: Sequence[str]) -> _Decoded:
    # cog true, T, cog magnetic, M, sog knots, N, sog km/h, K, [mode]
    _need(f, 8)
    cog = _number(f[0], "course over ground")
    if cog is not None:
        _one_of(f[1], "T", "course reference")
    sog_kn = _number(f[4], "speed in knots")
    if sog_kn is not None:
        _one_of(f[5], "N", "speed unit")
    sog_kmh = _number(f[6], "speed in km/h")
    if sog_kmh is not None:
        _one_of(f[7], "K", "speed unit")
    values: dict[str, float] = {}
    if len(f) > 8 and f[8] == "N":  # mode N: not valid
        return _Decoded(values)
    _put(values, "cog_deg", cog)
    _put(values, "sog_kn", sog_kn)
    _put(values, "sog_kmh", sog_kmh)
    return _Decoded(values)


def _decode_hdt(f: Sequence[str]) -> _Decoded:
    _need(f, 2)
    heading = _number(f[0], "heading")
    if heading is not None:
        _one_of(f[1], "T", "heading reference")
    values: dict[str, float] = {}
    _put(values, "heading_deg", heading)
    return _Decoded(values)


def _decode_mwv(f: Sequence[str]) -> _Decoded:
    # angle, reference R/T, speed, unit K/M/N/S, status A/V
    _need(f, 5)
    angle = _number(f[0], "wind angle")
    speed = _number(f[2], "wind speed")
    values: dict[str, float] = {}
    if _one_of(f[4], "AV", "status") == "V" or (angle is None and speed is None):
        return _Decoded(values)
    suffix = "rel" if _one_of(f[1], "RT", "wind reference") == "R" else "true"
    _put(values, f"wind_angle_{suffix}", angle)
    if speed is not None:
        unit = _one_of(f[3], "NMKS", "wind speed unit")
        values[f"wind_speed_{suffix}"] = speed * WIND_SPEED_TO_M_S[unit]
    return _Decoded(values)


def _decode_mtw(f: Sequence[str]) -> _Decoded:
    _need(f, 2)
    temperature = _number(f[0], "water temperature")
    if temperature is not None:
        _one_of(f[1], "C", "temperature unit")
    values: dict[str, float] = {}
    _put(values, "water_temp_c", temperature)
    return _Decoded(values)


def _decode_xdr(f: Sequence[str]) -> _Decoded:
    # Quadruples of transducer type, value, unit, name; the unit is the instrument's own.
    if not f or len(f) % 4:
        raise _FieldError(f"has {len(f)} fields, expected groups of 4 (type, value, unit, name)")
    values: dict[str, float] = {}
    for start in range(0, len(f), 4):
        kind, value_text, _unit, name = f[start : start + 4]
        value = _number(value_text, f"transducer {name or kind!r} value")
        if value is None:
            continue
        # An unnamed transducer is known only by its type and place in the sentence.
        channel = xdr_channel(name or f"{kind or 'unnamed'}{start // 4}")
        values[channel] = value
    return _Decoded(values)


_DECODERS: dict[str, Callable[[Sequence[str]], _Decoded]] = {
    "GGA": _decode_gga,
    "RMC": _decode_rmc,
    "VTG": _decode_vtg,
    "HDT": _decode_hdt,
    "MWV": _decode_mwv,
    "MTW": _decode_mtw,
    "XDR": _decode_xdr,
}


def _excerpt(text: str) -> str:
    shown = ascii(text[:EXCERPT_CHARS])
    return shown + "..." if len(text) > EXCERPT_CHARS else shown


# --------------------------------------------------------------------------------- position


@dataclass(frozen=True, slots=True)
class Position:
    """The last known position: from the latest GGA or RMC with a valid fix."""

    lat: float  # decimal degrees, south negative
    lon: float  # decimal degrees, west negative
    fix_time: datetime | None  # UTC time of the fix as the receiver reported it
    sog_kn: float | None  # speed over ground, from the latest RMC or VTG
    cog_deg: float | None  # course over ground (true), from the latest RMC or VTG
    received: datetime  # when the fix arrived here: how old the position is

    def as_dict(self) -> dict[str, float | str | None]:
        return {
            "lat": self.lat,
            "lon": self.lon,
            "fix_time": self.fix_time.isoformat() if self.fix_time else None,
            "sog_kn": self.sog_kn,
            "cog_deg": self.cog_deg,
            "received": self.received.isoformat(),
        }


def next_position(
    previous: Position | None, sentence: NmeaSentence, received: datetime
) -> Position | None:
    """The last known position after `sentence` arrived at `received` (aware UTC)."""
    values = sentence.values
    if sentence.sentence_type == "VTG" and previous is not None and values:
        return replace(
            previous,
            sog_kn=values.get("sog_kn", previous.sog_kn),
            cog_deg=values.get("cog_deg", previous.cog_deg),
        )
    if sentence.sentence_type not in ("GGA", "RMC") or "lat" not in values or "lon" not in values:
        return previous
    if sentence.sentence_type == "RMC":
        sog, cog = values.get("sog_kn"), values.get("cog_deg")
    else:  # GGA carries no motion: keep what RMC or VTG said last
        sog = previous.sog_kn if previous else None
        cog = previous.cog_deg if previous else None
    return Position(
        lat=values["lat"],
        lon=values["lon"],
        fix_time=_fix_time(sentence.utc_time, sentence.utc_date, received),
        sog_kn=sog,
        cog_deg=cog,
        received=received,
    )


def _fix_time(utc_time: time | None, utc_date: date | None, received: datetime) -> datetime | None:
    if utc_time is None:
        return None
    if utc_date is not None:
        return datetime.combine(utc_date, utc_time)
    # GGA has the time of day only: the fix is the one nearest to when it arrived (a fix from
    # 23:59:59 that arrives at 00:00:01 belongs to the day before).
    fix = datetime.combine(received.astimezone(UTC).date(), utc_time)
    if fix - received > timedelta(hours=12):
        fix -= timedelta(days=1)
    elif received - fix > timedelta(hours=12):
        fix += timedelta(days=1)
    return fix


# --------------------------------------------------------------------------------- transport


class LineSplitter:
    """Cuts a byte stream into lines (without the newline) for `on_line`, keeping at most
    `max_line` bytes of an unfinished line: a longer one goes to `on_overlong` (its first bytes)
    and is dropped up to the next newline, where reading picks up again. Both are called in
    stream order."""

    def __init__(
        self,
        max_line: int,
        on_line: Callable[[bytes], None],
        on_overlong: Callable[[bytes], None],
    ) -> None:
        self.max_line = max_line
        self._on_line = on_line
        self._on_overlong = on_overlong
        self._buffer = bytearray()
        self._discarding = False

    @property
    def buffered(self) -> int:
        """Bytes of the unfinished line held now (never more than `max_line`)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            piece = data[start:end]
            if self._discarding:
                self._discarding = False
                self._buffer.clear()
            elif len(self._buffer) + len(piece) > self.max_line:
                self._overlong(piece)
                self._discarding = False
            else:
                self._buffer += piece
                line = bytes(self._buffer)
                self._buffer.clear()
                self._on_line(line)
            start = end + 1
        rest = data[start:]
        if self._discarding:
            return
        if len(self._buffer) + len(rest) > self.max_line:
            self._overlong(rest)
        else:
            self._buffer += rest

    def _overlong(self, piece: bytes) -> None:
        start = bytes(self._buffer[:40] or piece[:40])
        self._buffer.clear()
        self._discarding = True
        self._on_overlong(start)


class _DatagramReceiver(asyncio.DatagramProtocol):
    """Hands every datagram to the source; `lost` resolves when the socket closes."""

    def __init__(self, on_datagram: Callable[[bytes], None]) -> None:
        self._on_datagram = on_datagram
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors answer datagrams we sent; a listener sends none, so there is nothing to do.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost.done():
            return
        if exc is None:
            self.lost.set_result(None)
        else:
            self.lost.set_exception(exc)


class NmeaSource(LiveSource):
    """NMEA 0183 sentences from a serial port, UDP datagrams (listening) or a TCP server.

    Each sentence with values is one column of the windows, stamped with its arrival time.
    `xdr_transducers` names the XDR transducers kept as channels `xdr.<name>`; values of other
    transducers are counted in `health.extra["xdr_unlisted"]` and dropped. Without a list, every
    transducer seen becomes a channel, up to MAX_XDR_CHANNELS (a misbehaving instrument inventing
    names must not grow records without bound).
    """

    transient = (OSError, serial.SerialException, ConnectionError, asyncio.IncompleteReadError)

    def __init__(self, cfg: NmeaSensor, *, xdr_transducers: Sequence[str] = ()) -> None:
        self.cfg = cfg
        xdr_channels = tuple(dict.fromkeys(xdr_channel(name) for name in xdr_transducers))
        super().__init__(cfg, NMEA_CHANNELS + xdr_channels)
        self._xdr_channels = frozenset(xdr_channels)
        self._xdr_listed = bool(xdr_channels)
        self._talkers = frozenset(cfg.talkers)
        self.last_position: Position | None = None
        self.health.extra.update(dict.fromkeys(HEALTH_COUNTERS, 0.0))

    async def _session(self) -> None:
        if self.cfg.transport == "udp":
            await self._udp_session()
        elif self.cfg.transport == "tcp":
            await self._tcp_session()
        else:
            await self._serial_session()

    async def _serial_session(self) -> None:
        reader, writer = await serial_asyncio.open_serial_connection(
            url=self.cfg.device, baudrate=self.cfg.baudrate
        )
        try:
            self._connected()
            await self._read_lines(reader)
        finally:
            await _close(writer)

    async def _tcp_session(self) -> None:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(self.cfg.host, self._port())
        try:
            self._connected()
            await self._read_lines(reader)
        finally:
            await _close(writer)

    async def _udp_session(self) -> None:
        loop = asyncio.get_running_loop()
        receiver = _DatagramReceiver(self._take_datagram)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: receiver, local_addr=(self.cfg.host, self._port())
        )
        try:
            self._connected()
            await receiver.lost
        finally:
            transport.close()

    def _port(self) -> int:
        if self.cfg.port is None:  # NmeaSensor's validator demands it for udp and tcp
            raise SourceError(
                self.name, f"transport {self.cfg.transport} needs `port`", retryable=False
            )
        return self.cfg.port

    async def _read_lines(self, reader: asyncio.StreamReader) -> None:
        """Lines until the peer closes the stream (EOF: return) or the link fails (raise)."""
        splitter = LineSplitter(MAX_LINE_BYTES, self._take_line, self._overlong)
        while chunk := await reader.read(READ_CHUNK_BYTES):
            splitter.feed(chunk)

    def _take_datagram(self, data: bytes) -> None:
        splitter = LineSplitter(MAX_LINE_BYTES, self._take_line, self._overlong)
        # A datagram ends its last line even without a newline.
        splitter.feed(data if data.endswith(b"\n") else data + b"\n")

    def _overlong(self, start: bytes) -> None:
        self.quality.add(
            "malformed",
            f"line longer than {MAX_LINE_BYTES} bytes without a newline, dropped: "
            f"{_excerpt(start.decode('ascii', errors='replace'))}",
        )

    def _take_line(self, raw: bytes) -> None:
        text = raw.decode("ascii", errors="replace").strip()
        if not text:
            return
        try:
            sentence = parse_sentence(text)
        except NmeaError as exc:
            self.quality.add(exc.reason, exc.detail)
            return
        if self._talkers and sentence.talker not in self._talkers:
            self._count("other_talker")
            return
        self._count("sentences")
        if not sentence.has_checksum:
            self._count("no_checksum")
        if not is_supported(sentence):
            self._count("unsupported")
            return
        now = utc_now()
        self.last_position = next_position(self.last_position, sentence, now)
        values = self._listed(sentence.values)
        if values:
            self._publish(values, now)

    def _listed(self, values: Mapping[str, float]) -> dict[str, float]:
        listed: dict[str, float] = {}
        for channel, value in values.items():
            if channel.startswith(XDR_PREFIX) and channel not in self._xdr_channels:
                if self._xdr_listed or len(self._xdr_channels) >= MAX_XDR_CHANNELS:
                    self._count("xdr_unlisted")
                    continue
                self._xdr_channels = self._xdr_channels | {channel}
                self._builder.add_channel(channel)
            listed[channel] = value
        return listed

    def _count(self, counter: str) -> None:
        self.health.extra[counter] = self.health.extra.get(counter, 0.0) + 1


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a stream; a link that already failed may fail again on the way out."""
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, serial.SerialException):
        pass
