"""Tests of sensors.mqtt against a real mosquitto on 127.0.0.1: payload decoding, channel routing
(channels added at run time for wildcard filters included), malformed input, reconnecting after a
broker restart, the persistent QoS 1 session, credentials, TLS, and the config refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import math
import re
import shutil
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from config.sensors import MqttSensor
from sensors.base import QualityReport, Reading, SampleWindow, SourceError
from sensors.mqtt import MalformedPayload, MqttSource, parse_payload
from tests.helpers import component_missing
from tests.mosquitto import MOSQUITTO, Broker

WAIT_S = 10.0


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Starts mosquitto brokers with extra config lines; kills them after the test."""
    if not MOSQUITTO.exists():
        component_missing("mosquitto (Debian package mosquitto)")
    started: list[Broker] = []

    def make(*settings: str) -> Broker:
        directory = tmp_path / f"broker{len(started)}"
        directory.mkdir()
        broker = Broker(directory, ["allow_anonymous true", *settings])
        started.append(broker)
        broker.start()
        return broker

    yield make
    for broker in started:
        broker.kill()


def _cfg(port: int, topics: list[dict[str, Any]], **overrides: Any) -> MqttSensor:
    raw: dict[str, Any] = {
        "name": "line1",
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": port,
        "window": "200ms",
        "reconnect_max": "500ms",
        "keepalive": "5s",
        "topics": topics,
    }
    raw.update(overrides)
    return MqttSensor.model_validate(raw)


class Consumer:
    """A source being read in a task, as the pipeline reads it; keeps every reading."""

    def __init__(self, source: MqttSource) -> None:
        self.source = source
        self.readings: list[Reading] = []
        self.task = asyncio.create_task(self._consume(), name=f"consume:{source.name}")

    async def _consume(self) -> None:
        async with self.source:
            async for reading in self.source.readings():
                self.readings.append(reading)

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait for `predicate`; a source that failed meanwhile raises its error."""
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            if self.task.done():
                self.task.result()
                raise AssertionError(f"the source ended while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; health {self.source.health}, "
                    f"quality {self.quality()}"
                )
            await asyncio.sleep(0.02)

    async def running(self) -> None:
        await self.until(lambda: self.source.health.state == "running", "state running")

    def values(self, channel: str) -> list[float]:
        seen: list[float] = []
        for reading in self.readings:
            if isinstance(reading, SampleWindow) and channel in reading.channels:
                row = reading.values[reading.channels.index(channel)]
                seen += [float(v) for v in row[~np.isnan(row)]]
        return seen

    def quality(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for reading in self.readings:
            if isinstance(reading, QualityReport):
                counts.update(reading.counts)
        return counts

    def examples(self) -> list[str]:
        return [
            example.detail
            for reading in self.readings
            if isinstance(reading, QualityReport)
            for example in reading.examples
        ]


@asynccontextmanager
async def consuming(source: MqttSource) -> AsyncIterator[Consumer]:
    consumer = Consumer(source)
    try:
        yield consumer
    finally:
        consumer.task.cancel()
        with suppress(asyncio.CancelledError):
            await consumer.task


async def _publish(port: int, messages: list[tuple[str, bytes]], **client_args: Any) -> None:
    """Publish with QoS 1 from a client of its own; returns once the broker has each one."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="test-publisher", **client_args) as c:
        for topic, payload in messages:
            await c.publish(topic, payload, qos=1)


async def test_numeric_and_json_payloads_reach_their_channels_scaled(
    make_broker: Callable[..., Broker],
) -> None:
    broker = make_broker()
    topics: list[dict[str, Any]] = [
        {"topic": "plant/temp", "scale": 2, "offset": 1},
        {"topic": "plant/+/pressure", "channel": "pressure", "field": "data.p", "scale": 0.5},
        {"topic": "plant/list", "channel": "second", "field": "values.1"},
        {"topic": "plant/flag", "channel": "flag", "field": "on"},
        # The first matching topic wins: line/special never reaches line_any.
        {"topic": "line/special", "channel": "special"},
        {"topic": "line/#", "channel": "line_any", "offset": -100},
    ]
    source = MqttSource(_cfg(broker.port, topics))
    assert source.channels == ("plant.temp", "pressure", "second", "flag", "special", "line_any")
    async with consuming(source) as consumer:
        await consumer.running()
        await _publish(
            broker.port,
            [
                ("plant/temp", b"21.5"),
                ("plant/temp", b" -3e1\n"),
                ("plant/a/pressure", b'{"data": {"p": 3}}'),
                ("plant/b/pressure", b'{"data": {"p": "8"}, "other": 1}'),
                ("plant/list", b'{"values": [1, 7.25]}'),
                ("plant/flag", b'{"on": true}'),
                ("plant/flag", b'{"on": false}'),
                ("line/special", b"5"),
                ("line/other/deep", b"6"),
            ],
        )
        await consumer.until(lambda: len(consumer.values("line_any")) == 1, "the last value")
        assert consumer.values("plant.temp") == [44.0, -59.0]
        assert consumer.values("pressure") == [1.5, 4.0]
        assert consumer.values("second") == [7.25]
        assert consumer.values("flag") == [1.0, 0.0]
        assert consumer.values("special") == [5.0]
        assert consumer.values("line_any") == [-94.0]
        assert consumer.quality() == Counter()
        assert source.health.extra == {"messages": 9.0, "malformed": 0.0}
        windows = [r for r in consumer.readings if isinstance(r, SampleWindow)]
        assert all(w.duration_s == 0.2 and w.channels == source.channels for w in windows)


async def test_malformed_payloads_are_counted_and_the_source_goes_on(
    make_broker: Callable[..., Broker],
) -> None:
    broker = make_broker()
    topics = [
        {"topic": "m/num", "channel": "num"},
        {"topic": "m/json", "channel": "js", "field": "data.v"},
    ]
    source = MqttSource(_cfg(broker.port, topics))
    async with consuming(source) as consumer:
        await consumer.running()
        await _publish(
            broker.port,
            [
                ("m/num", b"\xff\xfe21"),
                ("m/num", b"abc"),
                ("m/num", b""),
                ("m/json", b"not json"),
                ("m/json", b'{"data": {}}'),
                ("m/json", b'{"data": {"v": "high"}}'),
                ("m/json", b'{"data": {"v": [1]}}'),
                ("m/num", b"nan"),  # a number, which the window builder counts as `nan`
                ("m/num", b"7"),
                ("m/json", b'{"data": {"v": 2}}'),
            ],
        )
        await consumer.until(
            lambda: consumer.values("js") == [2.0] and sum(consumer.quality().values()) == 8,
            "the valid values and every bad one counted",
        )
        assert consumer.quality() == Counter(malformed=7, nan=1)
        assert consumer.values("num") == [7.0]
        examples = consumer.examples()
        assert "m/num: payload is not UTF-8 (bad byte at offset 0)" in examples
        assert "m/num: payload 'abc' is not a number" in examples
        assert source.health.state == "running"
        assert source.health.extra == {"messages": 10.0, "malformed": 7.0}


async def test_wildcard_filter_without_channel_adds_a_channel_per_topic(
    make_broker: Callable[..., Broker],
) -> None:
    broker = make_broker()
    topics: list[dict[str, Any]] = [
        {"topic": "sensors/+/temp", "scale": 2},
        {"topic": "$share/grp/plant/#", "field": "v"},
        {"topic": "fixed/v", "channel": "fixed"},
    ]
    source = MqttSource(_cfg(broker.port, topics), max_topic_channels=3)
    assert source.channels == ("fixed",)
    async with consuming(source) as consumer:
        await consumer.running()
        await _publish(
            broker.port,
            [
                ("sensors/a/temp", b"1"),
                ("sensors/b/temp", b"2"),
                ("sensors/a/temp", b"3"),
                ("sensors/bad topic/temp", b"4"),  # a space: no channel name
                ("sensors/c/temp", b"oops"),  # malformed payload: adds no channel
                ("plant/x", b'{"v": 5}'),  # the third channel from topics: the last allowed
                ("sensors/d/temp", b"6"),  # a fourth: past the cap
                ("sensors/b/temp", b"7"),  # an existing one still takes values
                ("fixed/v", b"8"),
            ],
        )
        await consumer.until(lambda: consumer.values("fixed") == [8.0], "the last value")
        # A list: mypy keeps the tuple type narrowed by the first check of the property.
        assert list(source.channels) == ["fixed", "sensors.a.temp", "sensors.b.temp", "plant.x"]
        assert consumer.values("sensors.a.temp") == [2.0, 6.0]
        assert consumer.values("sensors.b.temp") == [4.0, 14.0]
        assert consumer.values("plant.x") == [5.0]
        assert consumer.values("sensors.c.temp") == consumer.values("sensors.d.temp") == []
        await consumer.until(lambda: sum(consumer.quality().values()) == 3, "3 bad messages")
        assert consumer.quality() == Counter(malformed=3)
        assert consumer.examples() == [
            "sensors/bad topic/temp: topic cannot be a channel name ('sensors.bad topic.temp' is "
            "not 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit); set "
            "`channel` on its filter",
            "sensors/c/temp: payload 'oops' is not a number",
            "too many channels: topic 'sensors/d/temp' would add one past the 3 made from "
            "topics; its value is dropped",
        ]
        assert source.health.extra == {"messages": 9.0, "malformed": 3.0}
        windows = [r for r in consumer.readings if isinstance(r, SampleWindow)]
        assert windows[-1].channels == source.channels
        assert all(w.values.shape[0] == len(w.channels) for w in windows)


async def test_reconnects_after_the_broker_restarts(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker()
    source = MqttSource(_cfg(broker.port, [{"topic": "r/v", "channel": "v"}]))
    async with consuming(source) as consumer:
        await consumer.running()
        await _publish(broker.port, [("r/v", b"1")])
        await consumer.until(lambda: consumer.values("v") == [1.0], "the first value")

        await asyncio.to_thread(broker.kill)
        await consumer.until(lambda: source.health.state == "reconnecting", "reconnecting")
        assert source.health.error
        await asyncio.to_thread(
            broker.start
        )  # same port, and no persistence: the session is gone, so resubscribe
        await consumer.until(
            lambda: source.health.state == "running" and source.health.reconnects == 1,
            "running again after one reconnect",
        )
        await _publish(broker.port, [("r/v", b"2")])
        await consumer.until(lambda: consumer.values("v") == [1.0, 2.0], "the value after")
        assert source.health.reconnects == 1


async def test_qos1_messages_sent_while_away_arrive_on_reconnect(
    make_broker: Callable[..., Broker],
) -> None:
    broker = make_broker()
    cfg = _cfg(broker.port, [{"topic": "q/v", "channel": "v"}])
    first = MqttSource(cfg, appliance_id="app7")
    assert first.client_id == "appliance-app7-line1"
    async with consuming(first) as consumer:
        await consumer.running()
    assert first.health.state == "finished"

    # The appliance is away (its client disconnected); the broker keeps its session.
    await _publish(broker.port, [("q/v", b"11"), ("q/v", b"12"), ("q/v", b"13")])

    second = MqttSource(cfg, appliance_id="app7")
    async with consuming(second) as consumer:
        await consumer.until(lambda: len(consumer.values("v")) >= 3, "the queued values")
        assert consumer.values("v") == [11.0, 12.0, 13.0]


async def test_subscription_left_by_an_earlier_config_is_counted_not_fatal(
    make_broker: Callable[..., Broker],
) -> None:
    broker = make_broker()
    earlier = MqttSource(_cfg(broker.port, [{"topic": "old/v", "channel": "old"}]))
    async with consuming(earlier) as consumer:
        await consumer.running()

    # Same client id, other topics: the broker still holds the subscription to old/v.
    source = MqttSource(_cfg(broker.port, [{"topic": "new/v", "channel": "new"}]))
    assert source.client_id == earlier.client_id == "appliance-line1"
    async with consuming(source) as consumer:
        await consumer.running()
        await _publish(broker.port, [("old/v", b"1"), ("new/v", b"2")])
        await consumer.until(
            lambda: consumer.values("new") == [2.0] and consumer.quality()["malformed"] == 1,
            "the new value and the stray one counted",
        )
        assert consumer.examples() == ["old/v: matches none of the configured topics"]


async def test_bad_credentials_fail_the_source_for_good(
    make_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        component_missing("mosquitto_passwd (Debian package mosquitto)")
    password_file = tmp_path / "passwords"
    await asyncio.to_thread(
        subprocess.run, [passwd, "-b", "-c", str(password_file), "alice", "s3cret"], check=True
    )
    broker = make_broker("allow_anonymous false", f"password_file {password_file}")
    topics = [{"topic": "a/v", "channel": "v"}]

    # The right credentials work, so the refusals below are about the credentials.
    good = MqttSource(_cfg(broker.port, topics, username="alice", password="s3cret"))
    async with consuming(good) as consumer:
        await consumer.running()
        await _publish(broker.port, [("a/v", b"3")], username="alice", password="s3cret")
        await consumer.until(lambda: consumer.values("v") == [3.0], "the value")

    for overrides, expected in [
        ({"username": "alice", "password": "wrong"}, "refused the credentials of user 'alice'"),
        ({}, "refused a connection without credentials"),
    ]:
        bad = MqttSource(_cfg(broker.port, topics, **overrides))
        with pytest.raises(SourceError) as raised:
            async with asyncio.timeout(WAIT_S), bad:
                async for _ in bad.readings():
                    pass
        assert not raised.value.retryable
        assert expected in str(raised.value)
        assert bad.health.state == "failed"
        assert bad.health.reconnects == 0


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    now = dt.datetime.now(dt.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test-ca"))
        .issuer_name(name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("broker"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "broker.pem", directory / "broker.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_tls_with_a_ca_file(make_broker: Callable[..., Broker], tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    broker = make_broker(f"cafile {ca}", f"certfile {cert}", f"keyfile {key}")
    topics = [{"topic": "t/v", "channel": "v"}]
    source = MqttSource(_cfg(broker.port, topics, tls=True, ca_file=str(ca)))
    async with consuming(source) as consumer:
        await consumer.running()
        context = ssl.create_default_context(cafile=str(ca))
        await _publish(broker.port, [("t/v", b"4")], tls_context=context)
        await consumer.until(lambda: consumer.values("v") == [4.0], "the value over TLS")

    missing = MqttSource(_cfg(broker.port, topics, tls=True, ca_file=str(tmp_path / "nope.pem")))
    with pytest.raises(SourceError, match=r"cannot load CA bundle .*nope\.pem") as raised:
        async with asyncio.timeout(WAIT_S), missing:
            async for _ in missing.readings():
                pass
    assert not raised.value.retryable


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"topics": [{"topic": "a/#/b", "channel": "x"}]}, "'a/#/b' is not a valid MQTT filter"),
        ({"topics": [{"topic": "/leading"}]}, "topic '/leading' cannot be a channel name"),
        ({"topics": [{"topic": "a b"}]}, "topic 'a b' cannot be a channel name"),
    ],
)
def test_config_the_source_refuses(overrides: dict[str, Any], message: str) -> None:
    raw: dict[str, Any] = {"topics": [{"topic": "a/v"}], **overrides}
    with pytest.raises(SourceError) as raised:
        MqttSource(_cfg(1883, **raw))
    assert message in str(raised.value)
    assert "'line1'" in str(raised.value)
    assert not raised.value.retryable


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"password": "p"}, "`password` is set but `username` is not"),
        ({"ca_file": "/etc/ca.pem"}, "`ca_file` is set but `tls` is false"),
    ],
)
def test_config_load_refuses(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        _cfg(1883, [{"topic": "a/v"}], **overrides)


def test_topic_names_become_channel_names() -> None:
    source = MqttSource(
        _cfg(
            1883,
            [
                {"topic": "site/pump-1/temp_C"},
                {"topic": "$share/grp/site/flow"},
                {"topic": "site/+/level"},  # its channels come with its messages
            ],
        )
    )
    assert source.channels == ("site.pump-1.temp_C", "site.flow")
    assert source.client_id == "appliance-line1"
    assert MqttSource(_cfg(1883, [{"topic": "a"}], client_id="fixed")).client_id == "fixed"


@pytest.mark.parametrize(
    ("payload", "field", "expected"),
    [
        (b"21.5", None, 21.5),
        (b" -3e1\r\n", None, -30.0),
        (b".5", None, 0.5),
        (b"true", None, 1.0),
        (b"false", None, 0.0),
        (b"-inf", None, -math.inf),
        (b'{"data": {"temp": 4}}', "data.temp", 4.0),
        (b'{"values": [1, 2.5]}', "values.1", 2.5),
        (b'{"a": [{"b": " 3 "}]}', "a.0.b", 3.0),
        (b'{"on": false}', "on", 0.0),
        (b"[5, 6]", "1", 6.0),
    ],
)
def test_parse_payload_values(payload: bytes, field: str | None, expected: float) -> None:
    assert parse_payload(payload, field) == expected


@pytest.mark.parametrize(("payload", "field"), [(b"nan", None), (b'{"x": NaN}', "x")])
def test_parse_payload_passes_nan_on(payload: bytes, field: str | None) -> None:
    assert math.isnan(parse_payload(payload, field))


@pytest.mark.parametrize(
    ("payload", "field", "why"),
    [
        (b"\xc3(", None, "payload is not UTF-8 (bad byte at offset 0)"),
        (b"", None, "payload is empty"),
        (b"1_000", None, "payload '1_000' is not a number"),
        (b"0x10", None, "payload '0x10' is not a number"),
        ("٣".encode(), None, "payload '٣' is not a number"),
        (b"21.5 C", None, "payload '21.5 C' is not a number"),
        (b"x" * 100, None, "payload '" + "x" * 40 + "...' is not a number"),
        (b"nope", "a", "payload is not JSON (Expecting value: line 1 column 1 (char 0))"),
        (b"{}", "a", "JSON has no field 'a' (the document has no 'a')"),
        (b'{"a": {}}', "a.b", "JSON has no field 'a.b' ('a' has no 'b')"),
        (b'{"a": 1}', "a.b", "JSON has no field 'a.b' ('a' is a number, not an object)"),
        (b'{"a": [1]}', "a.1", "JSON has no field 'a.1' ('a' has 1 items, no index 1)"),
        (b'{"a": [1]}', "a.x", "JSON has no field 'a.x' ('a' is a list and 'x' is no index)"),
        (b'{"a": null}', "a", "field 'a' is null, not a number"),
        (b'{"a": {"b": 1}}', "a", "field 'a' is an object, not a number"),
        (b'{"a": "hot"}', "a", "field 'a' = 'hot' is not a number"),
        (b'{"a": 1' + b"0" * 400 + b"}", "a", "field 'a' is too large for a float"),
    ],
)
def test_parse_payload_malformed(payload: bytes, field: str | None, why: str) -> None:
    with pytest.raises(MalformedPayload) as raised:
        parse_payload(payload, field)
    assert str(raised.value) == why
