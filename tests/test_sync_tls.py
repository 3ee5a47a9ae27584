"""HTTPS between the http destination and the reference receiver: a private CA (ca_file), client
certificates the receiver requires (client_cert/client_key, --client-ca), and the clear,
permanent errors when either side's certificate is wrong."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from config.shipping import HttpDestination, SyncSection
from receiver import build_receiver_app, serve_receiver, server_tls_context
from sync import Journal, NewRecord, PayloadStore, Priority
from sync.destination import DestinationError
from sync.engine import SyncEngine
from sync.http_client import HttpTarget
from tests.conftest import APPLIANCE_ID
from tests.helpers import run_cli

TOKEN = "tls-token"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _ca(directory: Path, name: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def _leaf(
    directory: Path,
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    usage: x509.ObjectIdentifier,
) -> tuple[Path, Path]:
    ca_cert, ca_key = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_path, ca_cert, ca_key = _ca(directory, "shore-ca")
    other_ca, _, _ = _ca(directory, "someone-elses-ca")
    server_cert, server_key = _leaf(
        directory, "receiver", (ca_cert, ca_key), ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_cert, client_key = _leaf(
        directory, APPLIANCE_ID, (ca_cert, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, other_ca)


def _engine(
    journal: Journal, store: PayloadStore, url: str, token_file: Path, **tls: object
) -> tuple[SyncEngine, HttpTarget]:
    cfg = HttpDestination.model_validate(
        {"name": "shore", "type": "http", "url": url, "token_file": str(token_file), **tls}
    )
    settings = SyncSection.model_validate({"chunk_size": "64KiB"})
    target = HttpTarget(cfg, APPLIANCE_ID, settings.chunk_size)
    return SyncEngine(journal, store, target, cfg, settings), target


async def _backlog(journal: Journal, store: PayloadStore) -> bytes:
    snapshot = b"\xff\xd8" + bytes(range(256)) * 1000
    ref = await store.put(snapshot)
    await journal.append(NewRecord("cam", "person", Priority.ALERT, {"i": 0}, payloads=(ref,)))
    for i in range(1, 50):
        await journal.append(NewRecord("s", "reading", Priority.TELEMETRY, {"i": i}))
    return snapshot


async def test_https_with_a_private_ca_and_client_certificates_delivers_everything(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path, pki: Pki
) -> None:
    snapshot = await _backlog(journal, payload_store)
    (tmp_path / "token").write_text(TOKEN)
    rdata = tmp_path / "receiver"
    app = build_receiver_app(rdata, {APPLIANCE_ID: TOKEN}, require_client_certificate=True)
    tls = server_tls_context(pki.server_cert, pki.server_key, client_ca=pki.ca)
    async with serve_receiver(app, "127.0.0.1", 0, tls) as bound:
        engine, target = _engine(
            journal,
            payload_store,
            f"https://127.0.0.1:{bound[0][1]}",
            tmp_path / "token",
            ca_file=str(pki.ca),
            client_cert=str(pki.client_cert),
            client_key=str(pki.client_key),
        )
        async with target:
            assert await target.reachable() is True
            assert await engine.drain() is True
    assert engine.state.records_sent == 50
    copies = list((rdata / "payloads" / APPLIANCE_ID).iterdir())
    assert [copy.read_bytes() for copy in copies] == [snapshot]


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ({"ca_file": "OTHER_CA"}, r"certificate is not trusted.*check ca_file"),
        ({"ca_file": "CA"}, r"403 \(check client_cert/client_key\).*client certificate required"),
    ],
    ids=["receiver-signed-by-an-unknown-ca", "no-client-certificate"],
)
async def test_a_certificate_problem_is_a_clear_permanent_error(
    journal: Journal,
    payload_store: PayloadStore,
    tmp_path: Path,
    pki: Pki,
    tls: dict[str, str],
    expected: str,
) -> None:
    await _backlog(journal, payload_store)
    (tmp_path / "token").write_text(TOKEN)
    files = {"CA": str(pki.ca), "OTHER_CA": str(pki.other_ca)}
    app = build_receiver_app(
        tmp_path / "receiver", {APPLIANCE_ID: TOKEN}, require_client_certificate=True
    )
    server_tls = server_tls_context(pki.server_cert, pki.server_key, client_ca=pki.ca)
    async with serve_receiver(app, "127.0.0.1", 0, server_tls) as bound:
        url = f"https://127.0.0.1:{bound[0][1]}"
        engine, target = _engine(
            journal,
            payload_store,
            url,
            tmp_path / "token",
            **{key: files[value] for key, value in tls.items()},
        )
        async with target:
            with pytest.raises(DestinationError, match=expected) as probe:
                await target.reachable()
            assert probe.value.retryable is False
            with pytest.raises(DestinationError, match=expected) as drain:
                await engine.drain()
            assert drain.value.retryable is False
    assert await journal.read(lambda r: r.cursor("shore", Priority.ALERT)) == 0


async def test_an_unreadable_client_certificate_is_named(
    journal: Journal, payload_store: PayloadStore, tmp_path: Path, pki: Pki
) -> None:
    (tmp_path / "token").write_text(TOKEN)
    _, target = _engine(
        journal,
        payload_store,
        "https://127.0.0.1:9",
        tmp_path / "token",
        ca_file=str(pki.ca),
        client_cert=str(tmp_path / "missing.pem"),
    )
    with pytest.raises(DestinationError, match=r"cannot use client_cert .*missing\.pem") as caught:
        async with target:
            pass
    assert caught.value.retryable is False


def test_tls_settings_are_checked_against_the_url() -> None:
    with pytest.raises(ValueError, match="client_key needs client_cert"):
        HttpDestination.model_validate(
            {"name": "a", "type": "http", "url": "https://x", "client_key": "k.pem"}
        )
    with pytest.raises(ValueError, match="for https:// urls"):
        HttpDestination.model_validate(
            {"name": "a", "type": "http", "url": "http://x", "ca_file": "ca.pem"}
        )


def test_the_receiver_command_serves_https_and_checks_its_tls_files(
    tmp_path: Path, pki: Pki
) -> None:
    missing = run_cli(
        "receiver",
        "--listen",
        "127.0.0.1:0",
        "--data",
        str(tmp_path / "rx"),
        "--tls-cert",
        str(tmp_path / "nope.pem"),
    )
    assert (
        missing.returncode == 2 and "--tls-cert" in missing.stderr and "nope.pem" in missing.stderr
    )
    alone = run_cli(
        "receiver", "--listen", "127.0.0.1:0", "--data", str(tmp_path), "--client-ca", str(pki.ca)
    )
    assert alone.returncode == 2 and "need --tls-cert" in alone.stderr
    wrong_key = run_cli(
        "receiver",
        "--listen",
        "127.0.0.1:0",
        "--data",
        str(tmp_path / "rx"),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.client_key),
    )
    assert wrong_key.returncode == 2 and "TLS files" in wrong_key.stderr

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "receiver",
            "--listen",
            "127.0.0.1:0",
            "--data",
            str(tmp_path / "rx"),
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--client-ca",
            str(pki.ca),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    with proc.stdout:
        try:
            assert proc.stdout.readline().startswith("receiver listening on https://127.0.0.1:")
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0
