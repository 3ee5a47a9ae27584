"""OpcUaSource against a real asyncua server in this process on 127.0.0.1: values and their source
timestamps, nodes the server refuses, a server restart, a cut and a silent link (through
FaultProxy), user login and message security."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from config.sensors import OpcUaSensor
from sensors.base import QualityReport, Reading, SampleWindow, SourceError
from sensors.opcua import OpcUaSource
from tests.faultproxy import FaultProxy

NS = "ns=2;s=Plant."
SERVER_URI = "urn:edge-appliance:test:plant-server"
CLIENT_URI = "urn:edge-appliance:test:appliance"
# Values are written with source timestamps this far in the past: a source stamping values with
# their arrival time instead would be off by at least this much.
SOURCE_LAG = timedelta(milliseconds=400)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PasswordUsers(UserManager):
    """Lets in the user names whose password matches; refuses everyone else."""

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = passwords

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None and self.passwords.get(username) == password:
            return User(role=UserRole.User)
        return None


@dataclass
class PlantServer:
    """An OPC UA server with a few variables under `Plant`, written every 50 ms by a task.

    Tick k writes Temp = k, Pressure = 100 + k, Count = k (Int32), Running = k is even, each
    stamped `SOURCE_LAG` before now; `stamps[k]` keeps that source timestamp. Setpoint = 42
    never changes: it was written an hour ago. Label is a string."""

    port: int
    first_tick: int = 0
    users: dict[str, str] | None = None
    certificate: tuple[Path, Path] | None = None  # DER certificate, PEM key: secure endpoints only
    stamps: dict[int, datetime] = field(default_factory=dict)
    server: Server | None = None
    writer: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/plant/"

    async def start(self) -> None:
        server = Server(user_manager=PasswordUsers(self.users) if self.users else None)
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name("plant")
        if self.certificate is not None:
            await server.set_application_uri(SERVER_URI)
            await server.load_certificate(self.certificate[0])
            await server.load_private_key(self.certificate[1])
            server.set_security_policy(
                [
                    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                    ua.SecurityPolicyType.Basic256Sha256_Sign,
                ]
            )
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        if self.users:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        ns = await server.register_namespace("urn:edge-appliance:test:plant")
        plant = await server.nodes.objects.add_object(
            ua.NodeId(ua.String("Plant"), ua.Int16(ns)), "Plant"
        )
        variables = {
            "Temp": ua.Variant(0.0, ua.VariantType.Double),
            "Pressure": ua.Variant(100.0, ua.VariantType.Double),
            "Count": ua.Variant(0, ua.VariantType.Int32),
            "Running": ua.Variant(True, ua.VariantType.Boolean),
            "Label": ua.Variant("pump 3", ua.VariantType.String),
        }
        nodes = {
            name: await plant.add_variable(
                ua.NodeId(ua.String(f"Plant.{name}"), ua.Int16(ns)), name, value
            )
            for name, value in variables.items()
        }
        setpoint = await plant.add_variable(
            ua.NodeId(ua.String("Plant.Setpoint"), ua.Int16(ns)), "Setpoint", 0.0
        )
        await setpoint.write_value(
            ua.DataValue(
                ua.Variant(42.0, ua.VariantType.Double),
                SourceTimestamp=ua.DateTime.now(UTC) - timedelta(hours=1),
            )
        )
        await server.start()
        self.server = server
        self.writer = asyncio.create_task(self._write(nodes), name="plant-writer")

    async def _write(self, nodes: dict[str, Any]) -> None:
        tick = self.first_tick
        while True:
            stamp = ua.DateTime.now(UTC) - SOURCE_LAG
            self.stamps[tick] = stamp
            for name, value in (
                ("Temp", ua.Variant(float(tick), ua.VariantType.Double)),
                ("Pressure", ua.Variant(100.0 + tick, ua.VariantType.Double)),
                ("Count", ua.Variant(tick, ua.VariantType.Int32)),
                ("Running", ua.Variant(tick % 2 == 0, ua.VariantType.Boolean)),
            ):
                await nodes[name].write_value(ua.DataValue(value, SourceTimestamp=stamp))
            tick += 1
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.writer
            self.writer = None
        if self.server is not None:
            await self.server.stop()
            self.server = None


@contextlib.asynccontextmanager
async def plant(**kwargs: Any) -> AsyncIterator[PlantServer]:
    server = PlantServer(free_port(), **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def opcua_source(url: str, nodes: list[dict[str, Any]], **overrides: Any) -> OpcUaSource:
    cfg: dict[str, Any] = {
        "name": "plc",
        "type": "opcua",
        "url": url,
        "nodes": nodes,
        "window": 0.2,
        "publishing_interval": 0.05,
        "timeout": 1.0,
        "reconnect_max": 0.5,
    }
    cfg.update(overrides)
    return OpcUaSource(OpcUaSensor.model_validate(cfg))


async def collect(
    source: OpcUaSource, done: Callable[[list[Reading]], bool], within_s: float = 15
) -> list[Reading]:
    """Readings from the entered source until `done(readings)` holds."""
    readings: list[Reading] = []
    async with asyncio.timeout(within_s), contextlib.aclosing(source.readings()) as stream:
        async for reading in stream:
            readings.append(reading)
            if done(readings):
                break
    return readings


def samples(readings: list[Reading], channel: str) -> list[tuple[datetime, float]]:
    """Every value of `channel` in the windows, with its time."""
    found: list[tuple[datetime, float]] = []
    for window in readings:
        if not isinstance(window, SampleWindow):
            continue
        assert window.times_s is not None
        row = window.channels.index(channel)
        for column, value in enumerate(window.values[row]):
            if np.isfinite(value):
                found.append((window.ts + timedelta(seconds=float(window.times_s[column])), value))
    return found


def issues(readings: list[Reading]) -> list[str]:
    return [
        f"{issue.reason}: {issue.detail}"
        for report in readings
        if isinstance(report, QualityReport)
        for issue in report.examples
    ]


async def test_values_flow_scaled_on_their_channels_at_their_source_timestamps() -> None:
    async with plant() as server:
        source = opcua_source(
            server.url,
            [
                {"node_id": NS + "Temp", "channel": "temp", "scale": 2.0, "offset": 1.0},
                {"node_id": NS + "Setpoint", "channel": "setpoint"},
                {"node_id": NS + "Pressure", "channel": "pressure"},
                {"node_id": NS + "Count", "channel": "count", "scale": 0.5, "offset": -1.0},
                {"node_id": NS + "Running", "channel": "running"},
                {"node_id": NS + "Temp", "channel": "temp_f", "scale": 1.8, "offset": 32.0},
            ],
        )
        async with source:
            readings = await collect(source, lambda got: len(samples(got, "count")) >= 12)
        assert source.health.state == "finished"

    windows = [r for r in readings if isinstance(r, SampleWindow)]
    assert windows[0].channels == ("temp", "setpoint", "pressure", "count", "running", "temp_f")
    # No clock_backwards: the setpoint's hour-old stamp did not send the windows back in time.
    assert issues(readings) == []
    expected: dict[str, Callable[[int], float]] = {
        "temp": lambda k: 2.0 * k + 1.0,
        "pressure": lambda k: 100.0 + k,
        "count": lambda k: 0.5 * k - 1.0,
        "temp_f": lambda k: 1.8 * k + 32.0,
    }
    for channel, value_of in expected.items():
        ticks = {value_of(k): k for k in server.stamps}
        seen = samples(readings, channel)
        assert len(seen) >= 10, channel
        for index, (at, value) in enumerate(seen):
            assert value in ticks, f"{channel}: {value} is no tick's value"
            stamp = server.stamps[ticks[value]]
            if index == 0:
                # The value current on subscribing may count from a later value's time.
                assert stamp <= at < stamp + timedelta(seconds=1), (channel, at, stamp)
            else:
                assert abs((at - stamp).total_seconds()) < 1e-3, (channel, value, at, stamp)
    # The setpoint has not changed for an hour: its one value counts from when we subscribed.
    [(setpoint_at, setpoint)] = samples(readings, "setpoint")
    assert setpoint == 42.0
    assert samples(readings, "temp")[0][0] <= setpoint_at < samples(readings, "temp")[1][0]
    assert {value for _, value in samples(readings, "running")} == {0.0, 1.0}
    # One node feeding two channels is one data change, so both land in the same column.
    assert [at for at, _ in samples(readings, "temp")] == [
        at for at, _ in samples(readings, "temp_f")
    ]
    assert source.health.extra["nodes_subscribed"] == 5
    assert source.health.extra["data_changes"] >= 4 * 12
    assert source.health.reconnects == 0


async def test_a_node_the_server_refuses_is_reported_by_name_and_the_others_flow() -> None:
    async with plant() as server:
        source = opcua_source(
            server.url,
            [
                {"node_id": NS + "Temp", "channel": "temp"},
                {"node_id": NS + "NoSuchNode", "channel": "ghost"},
                {"node_id": "ns=2;s=Plant", "channel": "folder"},  # an object has no value
                {"node_id": NS + "Label", "channel": "label"},  # a string
            ],
        )

        def enough(got: list[Reading]) -> bool:
            return len(samples(got, "temp")) >= 5 and len(issues(got)) >= 3

        async with source:
            readings = await collect(source, enough)
            assert source.health.state == "running"

        found = issues(readings)
        assert any(
            "ns=2;s=Plant.NoSuchNode" in issue and "ghost" in issue and "BadNodeIdUnknown" in issue
            for issue in found
        ), found
        assert any("ns=2;s=Plant " in issue and "BadAttributeIdInvalid" in issue for issue in found)
        assert any(
            "ns=2;s=Plant.Label" in issue and "str value 'pump 3' is not a number" in issue
            for issue in found
        ), found
        assert all(issue.startswith("malformed: ") for issue in found)
        assert not samples(readings, "ghost") and not samples(readings, "label")
        assert source.health.extra["nodes_subscribed"] == 2

        # With no node to watch there is nothing to run: the session fails and retries.
        nothing = opcua_source(server.url, [{"node_id": NS + "NoSuchNode", "channel": "ghost"}])
        async with nothing:
            with pytest.raises(TimeoutError):
                await collect(nothing, lambda got: False, within_s=1.5)
            assert nothing.health.state == "reconnecting"
            assert nothing.health.error is not None
            assert "refused every node" in nothing.health.error
            assert "ns=2;s=Plant.NoSuchNode: BadNodeIdUnknown" in nothing.health.error


async def test_a_malformed_node_id_fails_the_source_naming_it() -> None:
    source = opcua_source(
        f"opc.tcp://127.0.0.1:{free_port()}/",
        [{"node_id": NS + "Temp", "channel": "temp"}, {"node_id": "ns=2;x=Temp", "channel": "t2"}],
    )
    with pytest.raises(SourceError, match=r"node id 'ns=2;x=Temp' \(channel 't2'\)") as caught:
        async with source:
            await collect(source, lambda got: False, within_s=5)
    assert caught.value.retryable is False
    assert source.health.state == "failed"


class Consumed:
    """A source entered and read in the background: its readings, and the states it went
    through while the test waited on it."""

    def __init__(self, source: OpcUaSource) -> None:
        self.source = source
        self.readings: list[Reading] = []
        self.states: list[str] = []
        self._consumer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Consumed:
        await self.source.__aenter__()
        self._consumer = asyncio.create_task(self._consume(), name="consumer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        await self.source.__aexit__(None, None, None)

    async def _consume(self) -> None:
        async for reading in self.source.readings():
            self.readings.append(reading)

    async def until(self, what: str, predicate: Callable[[], bool], within_s: float) -> None:
        try:
            async with asyncio.timeout(within_s):
                while True:
                    if not self.states or self.states[-1] != self.source.health.state:
                        self.states.append(self.source.health.state)
                    if predicate():
                        return
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(
                f"no {what} after {within_s} s; states {self.states}, "
                f"error {self.source.health.error!r}"
            ) from None

    def values(self, channel: str) -> list[float]:
        return [value for _, value in samples(self.readings, channel)]

    def states_after_start(self) -> list[str]:
        return [state for state in self.states if state != "starting"]


async def test_a_restarted_server_is_reconnected_and_values_flow_again() -> None:
    server = PlantServer(free_port())
    await server.start()
    source = opcua_source(server.url, [{"node_id": NS + "Temp", "channel": "temp"}])
    try:
        async with Consumed(source) as run:
            await run.until("values", lambda: len(run.values("temp")) >= 5, 10)
            assert source.health.state == "running"
            await server.stop()
            # The socket closes with the server: noticed at once, not after a timeout.
            await run.until("reconnecting", lambda: source.health.state == "reconnecting", 2)
            server = PlantServer(server.port, first_tick=1000)
            await server.start()
            await run.until("running again", lambda: source.health.state == "running", 15)
            await run.until("new values", lambda: max(run.values("temp")) >= 1000, 5)
    finally:
        await server.stop()

    assert run.states_after_start() == ["running", "reconnecting", "running"], run.states
    assert source.health.reconnects == 1
    assert source.health.error is None
    assert issues(run.readings) == []


async def test_a_cut_or_silent_link_is_detected_and_reconnected() -> None:
    async with plant() as server, FaultProxy("127.0.0.1", server.port) as proxy:
        source = opcua_source(
            f"opc.tcp://127.0.0.1:{proxy.port}/plant/",
            [
                {"node_id": NS + "Temp", "channel": "temp"},
                {"node_id": NS + "Setpoint", "channel": "setpoint"},
            ],
        )
        async with Consumed(source) as run:
            await run.until("values", lambda: len(run.values("temp")) >= 3, 10)

            proxy.cut_all()
            await run.until("a reconnect", lambda: source.health.reconnects == 1, 10)
            flowing = len(run.values("temp"))
            await run.until("values again", lambda: len(run.values("temp")) > flowing + 3, 5)

            # A link that goes silent (a server hung, a cable pulled behind a switch) closes no
            # socket: the client's keep-alive read of the server state times out.
            proxy.stall(True)
            silent_at = asyncio.get_running_loop().time()
            await run.until("the silence noticed", lambda: source.health.state != "running", 10)
            noticed_after = asyncio.get_running_loop().time() - silent_at
            proxy.clear()
            proxy.cut_all()
            await run.until("a second reconnect", lambda: source.health.reconnects == 2, 15)
            flowing = len(run.values("temp"))
            await run.until("values again", lambda: len(run.values("temp")) > flowing + 3, 5)

    assert run.states_after_start() == [
        "running",
        "reconnecting",
        "running",
        "reconnecting",
        "running",
    ], run.states
    # Within two keep-alive periods (`timeout` is 1 s), not the library's hour-long defaults.
    assert noticed_after < 3.0
    # The setpoint never changed: the copies of it each new subscription sends are not new
    # samples.
    assert run.values("setpoint") == [42.0]
    assert issues(run.readings) == []


async def test_user_and_password_log_in_and_a_wrong_password_is_a_clear_error() -> None:
    async with plant(users={"operator": "s3cret"}) as server:
        good = opcua_source(
            server.url,
            [{"node_id": NS + "Temp", "channel": "temp"}],
            username="operator",
            password="s3cret",
        )
        async with good:
            readings = await collect(good, lambda got: len(samples(got, "temp")) >= 3)
        assert len(samples(readings, "temp")) >= 3

        wrong = opcua_source(
            server.url,
            [{"node_id": NS + "Temp", "channel": "temp"}],
            username="operator",
            password="guess",
        )
        with pytest.raises(SourceError, match="refused user 'operator'") as caught:
            async with wrong:
                await collect(wrong, lambda got: False, within_s=10)
        assert caught.value.retryable is False
        assert "BadUserAccessDenied" in str(caught.value)
        assert wrong.health.state == "failed"


def write_certificate(
    directory: Path, name: str, uri: str, usage: x509.ObjectIdentifier, *, pem: bool
) -> tuple[Path, Path]:
    """A self-signed application instance certificate naming `uri` (and this host), with its
    key; PEM or DER certificate, PEM key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(uri),
                    x509.DNSName(socket.gethostname()),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, hashes.SHA256())
    )
    # A PEM certificate under a name asyncua would read as DER: the source must look inside.
    certificate_path = directory / (f"{name}.crt" if pem else f"{name}.der")
    encoding = serialization.Encoding.PEM if pem else serialization.Encoding.DER
    certificate_path.write_bytes(certificate.public_bytes(encoding))
    key_path = directory / f"{name}-key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate_path, key_path


async def test_signed_and_encrypted_sessions_with_basic256sha256(tmp_path: Path) -> None:
    server_cert, server_key = write_certificate(
        tmp_path, "plant", SERVER_URI, ExtendedKeyUsageOID.SERVER_AUTH, pem=False
    )
    client_cert, client_key = write_certificate(
        tmp_path, "appliance", CLIENT_URI, ExtendedKeyUsageOID.CLIENT_AUTH, pem=True
    )
    nodes = [{"node_id": NS + "Temp", "channel": "temp"}]
    async with plant(certificate=(server_cert, server_key)) as server:
        for mode, trusted in (("Sign", server_cert), ("SignAndEncrypt", None)):
            source = opcua_source(
                server.url,
                nodes,
                security_mode=mode,
                security_policy="Basic256Sha256",
                certificate=str(client_cert),
                private_key=str(client_key),
                server_certificate=None if trusted is None else str(trusted),
            )
            async with source:
                readings = await collect(source, lambda got: len(samples(got, "temp")) >= 3)
            assert len(samples(readings, "temp")) >= 3, mode

        # A key where the certificate should be is named before anything is sent.
        swapped = opcua_source(
            server.url,
            nodes,
            security_mode="Sign",
            certificate=str(client_key),
            private_key=str(client_key),
        )
        with pytest.raises(SourceError, match=r"certificate .*appliance-key\.pem is not a PEM"):
            async with swapped:
                await collect(swapped, lambda got: False, within_s=10)

        # The server offers no unsecured endpoint: without security the session is refused.
        plain = opcua_source(server.url, nodes)
        with pytest.raises(
            SourceError, match="offers no endpoint with security_mode None"
        ) as caught:
            async with plain:
                await collect(plain, lambda got: False, within_s=10)
        assert caught.value.retryable is False
