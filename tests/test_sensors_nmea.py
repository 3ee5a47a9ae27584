"""Tests of sensors.nmea: the parser and decoders, the last position, line splitting, and the
source over real UDP sockets, a real TCP server (with a restart) and a pseudo-terminal."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, date, datetime, time
from functools import reduce
from operator import xor
from typing import Any

import pytest

from config.sensors import NmeaSensor
from sensors.base import QualityReport, Reading, SampleWindow
from sensors.nmea import (
    CHANNEL_NAME,
    MAX_LINE_BYTES,
    NMEA_CHANNELS,
    LineSplitter,
    NmeaError,
    NmeaSource,
    Position,
    is_supported,
    next_position,
    parse_sentence,
    xdr_channel,
)

# Real-world sentences with the checksums their instruments sent.
GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
VTG = "$GPVTG,054.7,T,034.4,M,005.5,N,010.2,K*48"
MWV = "$WIMWV,214.8,R,0.1,K,A*28"

MUNICH_LAT = 48 + 7.038 / 60
MUNICH_LON = 11 + 31.0 / 60


def sentence(body: str, start: str = "$") -> str:
    """`body` framed with its checksum (XOR of the characters between the start and the *)."""
    return f"{start}{body}*{reduce(xor, body.encode('ascii'), 0):02X}"


def lines(*sentences: str) -> bytes:
    return "".join(f"{s}\r\n" for s in sentences).encode("ascii")


# ------------------------------------------------------------------------------------ parser


def test_checksum_helper_agrees_with_real_sentences() -> None:
    for real in (GGA, RMC, VTG, MWV):
        body = real[1 : real.index("*")]
        assert sentence(body) == real


def test_gga() -> None:
    parsed = parse_sentence(GGA)
    assert (parsed.talker, parsed.sentence_type) == ("GP", "GGA")
    assert len(parsed.fields) == 14
    assert parsed.has_checksum
    assert parsed.utc_time == time(12, 35, 19, tzinfo=UTC)
    assert parsed.values == pytest.approx(
        {
            "lat": MUNICH_LAT,
            "lon": MUNICH_LON,
            "fix_quality": 1.0,
            "satellites": 8.0,
            "hdop": 0.9,
            "altitude_m": 545.4,
        }
    )


def test_rmc() -> None:
    parsed = parse_sentence(RMC)
    assert (parsed.talker, parsed.sentence_type) == ("GP", "RMC")
    assert parsed.utc_date == date(1994, 3, 23)
    assert parsed.values == pytest.approx(
        {"lat": MUNICH_LAT, "lon": MUNICH_LON, "sog_kn": 22.4, "cog_deg": 84.4}
    )


@pytest.mark.parametrize(
    "body",
    [
        # status V: the receiver has no fix; the numbers it prints are not a position
        "GPRMC,123519,V,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W",
        # NMEA 2.3 mode N (not valid) beside status A
        "GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W,N",
    ],
)
def test_rmc_without_valid_fix_has_no_values(body: str) -> None:
    parsed = parse_sentence(sentence(body))
    assert parsed.values == {}
    assert parsed.utc_date == date(1994, 3, 23)


def test_vtg() -> None:
    parsed = parse_sentence(VTG)
    assert parsed.values == pytest.approx({"cog_deg": 54.7, "sog_kn": 5.5, "sog_kmh": 10.2})
    invalid = parse_sentence(sentence("GPVTG,054.7,T,034.4,M,005.5,N,010.2,K,N"))
    assert invalid.values == {}


def test_hdt_and_mtw() -> None:
    assert parse_sentence(sentence("HEHDT,274.07,T")).values == {"heading_deg": 274.07}
    assert parse_sentence(sentence("YXMTW,17.75,C")).values == {"water_temp_c": 17.75}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("WIMWV,214.8,R,0.1,K,A", {"wind_angle_rel": 214.8, "wind_speed_rel": 0.1 / 3.6}),
        ("WIMWV,30.0,R,10.0,N,A", {"wind_angle_rel": 30.0, "wind_speed_rel": 10 * 1852 / 3600}),
        ("WIMWV,45.5,T,7.5,M,A", {"wind_angle_true": 45.5, "wind_speed_true": 7.5}),
        ("WIMWV,45.5,T,36.0,K,A", {"wind_angle_true": 45.5, "wind_speed_true": 10.0}),
        ("WIMWV,45.5,T,7.5,M,V", {}),  # status V: the instrument says the data is invalid
        ("WIMWV,,R,,N,A", {}),
    ],
)
def test_mwv(body: str, expected: dict[str, float]) -> None:
    assert parse_sentence(sentence(body)).values == pytest.approx(expected)


def test_real_mwv_example() -> None:
    assert parse_sentence(MWV).values == pytest.approx(
        {"wind_angle_rel": 214.8, "wind_speed_rel": 0.1 / 3.6}
    )


def test_xdr_transducers_become_sanitised_channels() -> None:
    long_name = "Engine#1 oil pressure (port side; aft sensor) measured at the gallery"
    parsed = parse_sentence(
        sentence(f"IIXDR,C,19.52,C,TempAir,P,1.02481,B,Barometer,P,,B,Empty,P,3.5,B,{long_name}")
    )
    long_channel = xdr_channel(long_name)
    assert parsed.values == {"xdr.TempAir": 19.52, "xdr.Barometer": 1.02481, long_channel: 3.5}
    assert long_channel.startswith("xdr.Engine_1_oil_pressure__port_side")
    assert len(long_channel) == 64
    for channel in parsed.values:
        assert CHANNEL_NAME.fullmatch(channel), channel
    assert xdr_channel("Air Temp/2") == "xdr.Air_Temp_2"


def test_xdr_without_name_is_named_by_type_and_place() -> None:
    parsed = parse_sentence(sentence("IIXDR,C,19.5,C,,A,-3.0,D,"))
    assert parsed.values == {"xdr.C0": 19.5, "xdr.A1": -3.0}


def test_south_and_west_are_negative() -> None:
    parsed = parse_sentence(
        sentence("GPGGA,021030.25,3352.123,S,15112.456,W,2,11,1.2,12.0,M,20.1,M,3.2,0120")
    )
    assert parsed.values["lat"] == pytest.approx(-(33 + 52.123 / 60))
    assert parsed.values["lon"] == pytest.approx(-(151 + 12.456 / 60))
    assert parsed.utc_time == time(2, 10, 30, 250000, tzinfo=UTC)
    rmc = parse_sentence(sentence("GPRMC,021030,A,0012.500,S,00030.000,W,0.0,,010124,,"))
    assert rmc.values == pytest.approx({"lat": -12.5 / 60, "lon": -0.5, "sog_kn": 0.0})


def test_missing_checksum_is_accepted_and_said() -> None:
    parsed = parse_sentence(GGA[: GGA.index("*")])
    assert not parsed.has_checksum
    assert parsed.values == parse_sentence(GGA).values


def test_lower_case_checksum_is_accepted() -> None:
    framed = sentence("HEHDT,100.5,T")
    assert parse_sentence(framed[:-2] + framed[-2:].lower()).values == {"heading_deg": 100.5}


def test_bad_checksum_says_expected_and_found() -> None:
    altered = GGA.replace("545.4", "545.5")  # one digit changed in transit, checksum kept
    body = altered[1 : altered.index("*")]
    with pytest.raises(NmeaError) as caught:
        parse_sentence(altered)
    assert caught.value.reason == "bad_checksum"
    expected = reduce(xor, body.encode("ascii"), 0)
    assert f"expected checksum {expected:02X}, found 47" in caught.value.detail
    assert "545.5" in caught.value.detail  # the sentence itself, so it can be found


def test_empty_fields_mean_no_value() -> None:
    no_fix = parse_sentence(sentence("GPGGA,123520,,,,,0,00,,,M,,M,,"))
    assert no_fix.values == {"fix_quality": 0.0, "satellites": 0.0}
    # quality 0 with stale coordinates: not a position
    stale = parse_sentence(sentence("GPGGA,123520,4807.038,N,01131.000,E,0,03,9.9,545.4,M,,M,,"))
    assert stale.values == {"fix_quality": 0.0, "satellites": 3.0, "hdop": 9.9}
    no_motion = parse_sentence(sentence("GPRMC,123519,A,4807.038,N,01131.000,E,,,230394,,"))
    assert no_motion.values == pytest.approx({"lat": MUNICH_LAT, "lon": MUNICH_LON})
    assert parse_sentence(sentence("HEHDT,,T")).values == {}
    assert parse_sentence(sentence("YXMTW,,")).values == {}
    assert parse_sentence(sentence("GPVTG,,T,,M,3.0,N,,K")).values == {"sog_kn": 3.0}


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47", "start with $"),
        ("", "start with $"),
        ("$GPGGA,123519,4807.038,N", "has 3 fields, needs at least 14"),
        (GGA[:-1], "is not two hex digits"),
        ("$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*4G", "two hex digits"),
        (sentence("GPGGA,123519,48x7.038,N,01131.000,E,1,08,0.9,545.4,M,,M,,"), "latitude"),
        (sentence("GPGGA,123519,4807.038,X,01131.000,E,1,08,0.9,545.4,M,,M,,"), "hemisphere"),
        (sentence("GPGGA,123519,4807.038,,01131.000,E,1,08,0.9,545.4,M,,M,,"), "hemisphere"),
        (sentence("GPGGA,123519,9107.038,N,01131.000,E,1,08,0.9,545.4,M,,M,,"), "out of range"),
        (sentence("GPGGA,123519,4867.038,N,01131.000,E,1,08,0.9,545.4,M,,M,,"), "out of range"),
        (sentence("GPGGA,123519,4807.038,N,18131.000,E,1,08,0.9,545.4,M,,M,,"), "out of range"),
        (sentence("GPGGA,126519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,,M,,"), "UTC time"),
        (sentence("GPGGA,123519,4807.038,N,01131.000,E,1,eight,0.9,545.4,M,,M,,"), "satellites"),
        (sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,310294,003.1,W"), "date"),
        (sentence("GPRMC,123519,,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W"), "status"),
        (sentence("HEHDT,nan,T"), "not a number"),
        (sentence("HEHDT,inf,T"), "not a number"),
        (sentence("HEHDT,1e3,T"), "not a number"),
        (sentence("HEHDT,274.07,M"), "heading reference"),
        (sentence("WIMWV,214.8,X,0.1,K,A"), "wind reference"),
        (sentence("WIMWV,214.8,R,0.1,Q,A"), "wind speed unit"),
        (sentence("WIMWV,214.8,R,0.1,K,"), "status"),
        (sentence("YXMTW,17.75,F"), "temperature unit"),
        (sentence("IIXDR,C,19.52,C"), "groups of 4"),
        (sentence("IIXDR,C,warm,C,TempAir"), "'TempAir' value"),
        (sentence("gpgga,123519"), "address"),
        (sentence("GP,1,2"), "address"),
        ("$", "address"),
        ("$GP\ufffdGA,123519*00", "non-ASCII"),
        ("$GPHDT,274.07,T\x00", "control characters"),
    ],
)
def test_malformed(line: str, says: str) -> None:
    with pytest.raises(NmeaError) as caught:
        parse_sentence(line)
    assert caught.value.reason == "malformed"
    assert says in caught.value.detail


def test_unknown_types_are_returned_without_values() -> None:
    gsv = parse_sentence(
        sentence("GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00")
    )
    assert (gsv.talker, gsv.sentence_type, gsv.values) == ("GP", "GSV", {})
    assert not is_supported(gsv)
    ais = parse_sentence(sentence("AIVDM,1,1,,B,177KQJ5000G?tO`K>RA1wUbN0TKH,0", start="!"))
    assert (ais.talker, ais.sentence_type, ais.values) == ("AI", "VDM", {})
    garmin = parse_sentence(sentence("PGRME,15.0,M,45.0,M,25.0,M"))
    assert (garmin.talker, garmin.sentence_type, garmin.values) == ("P", "GRME", {})
    assert not is_supported(garmin)
    assert is_supported(parse_sentence(GGA))


def test_garbage_never_raises_anything_but_nmea_error() -> None:
    rng = random.Random(20240601)
    valid = [GGA, RMC, VTG, MWV, sentence("IIXDR,C,19.52,C,TempAir"), sentence("HEHDT,1.0,T")]
    candidates = [bytes(rng.randrange(256) for _ in range(rng.randrange(90))) for _ in range(400)]
    for _ in range(2000):
        mutated = bytearray(rng.choice(valid).encode("ascii"))
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        candidates.append(bytes(mutated))
    outcomes: Counter[str] = Counter()
    for raw in candidates:
        try:
            parse_sentence(raw.decode("ascii", errors="replace"))
            outcomes["parsed"] += 1
        except NmeaError as exc:
            outcomes[exc.reason] += 1
    assert outcomes["malformed"] > 0 and outcomes["bad_checksum"] > 0
    assert sum(outcomes.values()) == len(candidates)


# ---------------------------------------------------------------------------------- position


def test_position_from_rmc_then_gga_keeps_motion() -> None:
    arrived = datetime(1994, 3, 23, 12, 35, 20, tzinfo=UTC)
    from_rmc = next_position(None, parse_sentence(RMC), arrived)
    assert from_rmc is not None
    assert (from_rmc.lat, from_rmc.lon) == pytest.approx((MUNICH_LAT, MUNICH_LON))
    assert from_rmc.fix_time == datetime(1994, 3, 23, 12, 35, 19, tzinfo=UTC)
    assert (from_rmc.sog_kn, from_rmc.cog_deg) == (22.4, 84.4)

    south = sentence("GPGGA,123521,3352.123,S,15112.456,W,1,08,0.9,10.0,M,,M,,")
    from_gga = next_position(from_rmc, parse_sentence(south), arrived)
    assert from_gga is not None
    assert from_gga.lat == pytest.approx(-(33 + 52.123 / 60))
    assert (from_gga.sog_kn, from_gga.cog_deg) == (22.4, 84.4)  # GGA carries no motion

    after_vtg = next_position(from_gga, parse_sentence(VTG), arrived)
    assert after_vtg is not None
    assert (after_vtg.lat, after_vtg.sog_kn, after_vtg.cog_deg) == (from_gga.lat, 5.5, 54.7)

    document = json.loads(json.dumps(after_vtg.as_dict()))
    assert document == {
        "lat": after_vtg.lat,
        "lon": after_vtg.lon,
        "fix_time": "1994-03-23T12:35:21+00:00",
        "sog_kn": 5.5,
        "cog_deg": 54.7,
        "received": "1994-03-23T12:35:20+00:00",
    }


def test_position_ignores_sentences_without_a_valid_fix() -> None:
    arrived = datetime(2024, 1, 1, tzinfo=UTC)
    known = Position(1.0, 2.0, None, None, None, arrived)
    no_fix_rmc = sentence("GPRMC,123519,V,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W")
    no_fix_gga = sentence("GPGGA,123520,4807.038,N,01131.000,E,0,03,9.9,545.4,M,,M,,")
    for text in (no_fix_rmc, no_fix_gga, MWV):
        assert next_position(known, parse_sentence(text), arrived) is known
    assert next_position(None, parse_sentence(VTG), arrived) is None


def test_gga_fix_time_just_before_midnight_belongs_to_the_day_before() -> None:
    arrived = datetime(2024, 5, 2, 0, 0, 1, tzinfo=UTC)
    late = sentence("GPGGA,235959.5,4807.038,N,01131.000,E,1,08,0.9,545.4,M,,M,,")
    position = next_position(None, parse_sentence(late), arrived)
    assert position is not None
    assert position.fix_time == datetime(2024, 5, 1, 23, 59, 59, 500000, tzinfo=UTC)


# ------------------------------------------------------------------------------ line splitter


def test_line_splitter_joins_chunks_and_drops_overlong_lines() -> None:
    events: list[tuple[str, bytes]] = []
    splitter = LineSplitter(
        64, lambda line: events.append(("line", line)), lambda start: events.append(("long", start))
    )
    splitter.feed(b"$GPHDT,1")
    assert events == []
    splitter.feed(b"0.0,T\r\n$GPHD")
    assert events == [("line", b"$GPHDT,10.0,T\r")]
    splitter.feed(b"T,2.0,T\n\n")
    assert events[1:] == [("line", b"$GPHDT,2.0,T"), ("line", b"")]
    events.clear()
    # A peer that never sends a newline: the buffer stays bounded, the line is reported once.
    for _ in range(1000):
        splitter.feed(b"x" * 1000)
        assert splitter.buffered <= 64
    assert events == [("long", b"x" * 40)]
    splitter.feed(b"still the long line\n$GPHDT,3.0,T\n")
    assert events[1:] == [("line", b"$GPHDT,3.0,T")]
    events.clear()
    # Lines over the limit inside one chunk, in stream order with the good ones.
    splitter.feed(b"ok\n" + b"y" * 100 + b"\nfine\n" + b"z" * 65 + b"\n")
    assert events == [("line", b"ok"), ("long", b"y" * 40), ("line", b"fine"), ("long", b"z" * 40)]
    assert splitter.buffered == 0


# --------------------------------------------------------------------------- the live source


def nmea_config(**fields: Any) -> NmeaSensor:
    raw: dict[str, Any] = {
        "name": "nav",
        "type": "nmea",
        "window": "200ms",
        "reconnect_max": "300ms",
    }
    raw.update(fields)
    return NmeaSensor.model_validate(raw)


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_until(predicate: Callable[[], object], what: str, limit_s: float = 5.0) -> None:
    async with asyncio.timeout(limit_s):
        # Health has no event to wait on: poll it, as the daemon's health job does.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert predicate(), what


class Readings:
    """Drives `source.readings()` as the daemon does and keeps what came, in order."""

    def __init__(self, source: NmeaSource) -> None:
        self.source = source
        self.log: list[Reading] = []
        self._iterator = source.readings()
        self._first: asyncio.Future[Reading] | None = None

    async def start(self) -> None:
        """Start the source's session and wait until its link is up."""
        first = self._first = asyncio.ensure_future(anext(self._iterator))
        await wait_until(
            lambda: self.source.health.state == "running" or first.done(), "the source to run"
        )
        if first.done():
            first.result()  # raises what failed the source

    async def window_with(self, channel: str, limit_s: float = 5.0) -> SampleWindow:
        """Readings until a window with a value of `channel`."""
        async with asyncio.timeout(limit_s):
            while True:
                if self._first is not None:
                    reading = await self._first
                    self._first = None
                else:
                    reading = await anext(self._iterator)
                self.log.append(reading)
                if isinstance(reading, SampleWindow) and values_of([reading], channel):
                    return reading

    def windows(self) -> list[SampleWindow]:
        return [r for r in self.log if isinstance(r, SampleWindow)]

    def counts_before(self, window: SampleWindow) -> Counter[str]:
        """Quality counts of every report that came before `window`."""
        counts: Counter[str] = Counter()
        for reading in self.log:
            if reading is window:
                return counts
            if isinstance(reading, QualityReport):
                counts.update(reading.counts)
        raise AssertionError("that window never came")

    def details(self) -> list[str]:
        return [
            issue.detail for r in self.log if isinstance(r, QualityReport) for issue in r.examples
        ]

    async def aclose(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.cancel()
            with suppress(asyncio.CancelledError):
                await self._first
        await self._iterator.aclose()


def values_of(windows: list[SampleWindow], channel: str) -> list[float]:
    """The values `channel` had in `windows`, in order, leaving out the NaN of other columns."""
    found: list[float] = []
    for window in windows:
        if channel in window.channels:
            row = window.values[window.channels.index(channel)]
            found += [float(v) for v in row if not math.isnan(v)]
    return found


async def test_udp_datagrams_become_windows() -> None:
    port = free_port(socket.SOCK_DGRAM)
    source = NmeaSource(nmea_config(transport="udp", host="127.0.0.1", port=port))
    assert source.channels == NMEA_CHANNELS
    async with source:
        readings = Readings(source)
        try:
            await readings.start()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                sender.sendto(lines(GGA, RMC), ("127.0.0.1", port))  # two lines, one datagram
                # The last line of a datagram needs no newline.
                sender.sendto(
                    f"{MWV}\r\n{sentence('HEHDT,274.07,T')}".encode(), ("127.0.0.1", port)
                )
                await readings.window_with("heading_deg")
        finally:
            await readings.aclose()
    windows = readings.windows()
    assert values_of(windows, "lat") == pytest.approx([MUNICH_LAT, MUNICH_LAT])
    assert values_of(windows, "lon") == pytest.approx([MUNICH_LON, MUNICH_LON])
    assert values_of(windows, "altitude_m") == [545.4]
    assert values_of(windows, "sog_kn") == [22.4]
    assert values_of(windows, "wind_angle_rel") == [214.8]
    assert values_of(windows, "wind_speed_rel") == pytest.approx([0.1 / 3.6])
    assert values_of(windows, "heading_deg") == [274.07]
    assert sum(w.values.shape[1] for w in windows) == 4  # one column per sentence
    assert source.health.extra["sentences"] == 4
    assert source.last_position is not None
    assert source.last_position.sog_kn == 22.4
    assert source.last_position.lat == pytest.approx(MUNICH_LAT)


async def test_udp_talker_filter_checksumless_sentences_and_xdr_channels() -> None:
    port = free_port(socket.SOCK_DGRAM)
    cfg = nmea_config(transport="udp", host="127.0.0.1", port=port, talkers=["GP", "II"])
    source = NmeaSource(cfg, xdr_transducers=["TempAir", "TempAir"])
    assert source.channels == (*NMEA_CHANNELS, "xdr.TempAir")
    async with source:
        readings = Readings(source)
        try:
            await readings.start()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                payload = lines(
                    sentence("HEHDT,274.07,T"),  # talker HE is not wanted
                    "$GPGSV,1,1,01,03,03,111,00",  # unknown type, no checksum
                    sentence("IIXDR,C,19.52,C,TempAir,P,1.02481,B,Barometer"),
                )
                sender.sendto(payload, ("127.0.0.1", port))
                await readings.window_with("xdr.TempAir")
        finally:
            await readings.aclose()
    windows = readings.windows()
    assert values_of(windows, "xdr.TempAir") == [19.52]
    assert values_of(windows, "heading_deg") == []
    extra = source.health.extra
    assert (extra["other_talker"], extra["sentences"], extra["no_checksum"]) == (1, 2, 1)
    assert (extra["unsupported"], extra["xdr_unlisted"]) == (1, 1)
    assert readings.counts_before(windows[-1]) == Counter()  # none of that is bad input


async def test_without_a_list_every_xdr_transducer_becomes_a_channel_up_to_a_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sensors.nmea.MAX_XDR_CHANNELS", 2)
    port = free_port(socket.SOCK_DGRAM)
    source = NmeaSource(nmea_config(transport="udp", host="127.0.0.1", port=port))
    async with source:
        readings = Readings(source)
        try:
            await readings.start()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                payload = lines(
                    sentence("IIXDR,C,19.52,C,TempAir,P,1.02481,B,Barometer"),
                    sentence("IIXDR,A,-3.0,D,Pitch"),  # a third transducer: over the cap
                )
                sender.sendto(payload, ("127.0.0.1", port))
                await readings.window_with("xdr.Barometer")
        finally:
            await readings.aclose()
    windows = readings.windows()
    assert values_of(windows, "xdr.TempAir") == [19.52]
    assert values_of(windows, "xdr.Barometer") == [1.02481]
    assert "xdr.Pitch" not in source.channels
    assert source.health.extra["xdr_unlisted"] == 1


async def test_udp_bind_failure_is_transient() -> None:
    port = free_port(socket.SOCK_DGRAM)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", port))
    source = NmeaSource(nmea_config(transport="udp", host="127.0.0.1", port=port))
    async with source:
        readings = Readings(source)
        try:
            first = asyncio.ensure_future(readings.start())
            await wait_until(lambda: source.health.state == "reconnecting", "a failed bind")
            assert "in use" in (source.health.error or "")
            squatter.close()
            await first
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                sender.sendto(lines(sentence("HEHDT,12.5,T")), ("127.0.0.1", port))
                window = await readings.window_with("heading_deg")
        finally:
            squatter.close()
            await readings.aclose()
    assert values_of([window], "heading_deg") == [12.5]


class SentenceServer:
    """A real TCP server on 127.0.0.1, like an NMEA multiplexer: sends to every client."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        self.connections += 1
        try:
            await reader.read()  # until the client goes or stop() closes the connection
        except ConnectionError:
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
            self._clients.discard(writer)

    async def clients(self, count: int) -> None:
        await wait_until(lambda: len(self._clients) == count, f"{count} client(s)")

    def send(self, data: bytes) -> None:
        assert self._clients, "no client connected"
        for client in self._clients:
            client.write(data)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for client in list(self._clients):
            client.close()
        await self._server.wait_closed()
        await self.clients(0)


async def test_tcp_stream_survives_a_server_restart() -> None:
    server = SentenceServer()
    await server.start()
    source = NmeaSource(nmea_config(transport="tcp", host="127.0.0.1", port=server.port))
    async with source:
        readings = Readings(source)
        try:
            await readings.start()
            await server.clients(1)
            server.send(lines(GGA))
            before = await readings.window_with("lat")

            await server.stop()
            await wait_until(lambda: source.health.state == "reconnecting", "reconnecting")
            assert source.health.reconnects == 0
            await asyncio.sleep(0.4)  # connects are refused meanwhile: still reconnecting
            assert source.health.state == "reconnecting"
            assert source.health.reconnects == 0

            await server.start()  # the same port
            await wait_until(lambda: source.health.state == "running", "running again")
            await server.clients(1)
            server.send(lines(sentence("HEHDT,33.3,T")))
            after = await readings.window_with("heading_deg")
        finally:
            await readings.aclose()
            await server.stop()
    assert values_of([before], "lat") == pytest.approx([MUNICH_LAT])
    assert values_of([after], "heading_deg") == [33.3]
    assert source.health.reconnects == 1
    assert server.connections == 2


async def test_tcp_broken_sentences_are_counted_and_reading_goes_on() -> None:
    server = SentenceServer()
    await server.start()
    source = NmeaSource(nmea_config(transport="tcp", host="127.0.0.1", port=server.port))
    altered = GGA.replace("545.4", "545.5")
    async with source:
        readings = Readings(source)
        try:
            await readings.start()
            await server.clients(1)
            server.send(
                lines(altered, "$GPGGA,123519,4807.038,N")
                + b"\xff\xfe\x00\x13 binary noise \x80\x81\r\n"
                + b"$GPHDT,1\xff2.0,T\r\n"
                + b"$GPGGA," * 30_000  # 210 kB without a newline
                + b"\r\n"
                + lines(RMC)
            )
            first = await readings.window_with("lat")
            server.send(lines(sentence("HEHDT,1.5,T")))
            second = await readings.window_with("heading_deg")
            assert source.health.state == "running"  # bad input never failed the link
        finally:
            await readings.aclose()
            await server.stop()
    assert values_of([first], "lat") == pytest.approx([MUNICH_LAT])
    assert values_of([second], "heading_deg") == [1.5]
    assert readings.counts_before(second) == Counter({"bad_checksum": 1, "malformed": 4})
    details = "\n".join(readings.details())
    assert "expected checksum" in details and "found 47" in details
    assert "needs at least 14" in details
    assert "does not start with $ or !: '\\ufffd\\ufffd\\x00\\x13 binary noise" in details
    assert "non-ASCII or control characters: '$GPHDT,1\\ufffd2.0,T'" in details
    assert f"longer than {MAX_LINE_BYTES} bytes" in details
    assert source.health.extra["sentences"] == 2


async def test_serial_over_a_pseudo_terminal() -> None:
    master, slave = os.openpty()
    try:
        device = os.ttyname(slave)
        source = NmeaSource(nmea_config(transport="serial", device=device, baudrate=4800))
        async with source:
            readings = Readings(source)
            try:
                await readings.start()
                os.write(master, lines(sentence("YXMTW,17.75,C"), VTG) + b"\x00\xffnoise\r\n")
                window = await readings.window_with("water_temp_c")
                os.write(master, lines(sentence("HEHDT,90.0,T")))
                later = await readings.window_with("heading_deg")
                # The instrument goes away: the link fails, the source retries, nothing crashes.
                os.close(master)
                master = -1
                await wait_until(lambda: source.health.state == "reconnecting", "reconnecting")
            finally:
                await readings.aclose()
    finally:
        if master >= 0:
            os.close(master)
        os.close(slave)
    assert values_of([window, later], "water_temp_c") == [17.75]
    assert values_of([window, later], "sog_kn") == [5.5]
    assert values_of([later], "heading_deg") == [90.0]
    assert readings.counts_before(later) == Counter({"malformed": 1})
    assert source.health.error
