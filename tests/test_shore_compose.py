"""Tests of the shore side's shipping form, deploy/shore/ (docs/fleet.md, "Running the shore side
with compose"): the receiver config passes `appliance receiver config check`, HAProxy accepts
its config (`haproxy -c`), and the compose file's parts fit each other and the image. (The
compose stack itself pulls images from Docker Hub, which CI cannot reach; tests/test_fleet_shore.py
runs the same shape from Debian's PostgreSQL and HAProxy and SeaweedFS.)"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.cli import main as cli_main
from config.loader import load_receiver_config
from tests.helpers import ROOT, component_missing

SHORE = ROOT / "deploy" / "shore"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((SHORE / "compose.yaml").read_text())
    return loaded


def self_signed_pem(path: Path) -> None:
    """A certificate and its key in one PEM file, as HAProxy's `crt` takes them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shore.example")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_the_receiver_config_passes_config_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["receiver", "config", "check", str(SHORE / "receiver.yaml")]) == 0
    assert "ok (store postgres, objects s3)" in capsys.readouterr().out


def test_haproxy_accepts_its_config(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        component_missing("haproxy (Debian package haproxy)")
    pem = tmp_path / "shore.pem"
    self_signed_pem(pem)
    config = (SHORE / "haproxy.cfg").read_text()
    assert "/usr/local/etc/haproxy/shore.pem" in config
    checked = tmp_path / "haproxy.cfg"
    checked.write_text(config.replace("/usr/local/etc/haproxy/shore.pem", str(pem)))
    done = subprocess.run(
        [haproxy, "-c", "-f", str(checked)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_parts_fit_each_other_and_the_image() -> None:
    stack = compose()
    services = stack["services"]
    assert set(services) == {"postgres", "minio", "bucket", "receiver", "haproxy"}
    # Every secret and config a service names is declared, and configs are files here.
    for name, service in services.items():
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in stack["secrets"], f"{name}: secret {source}"
        for config in service.get("configs", []):
            assert config["source"] in stack["configs"], f"{name}: config {config['source']}"
    for config in stack["configs"].values():
        assert (SHORE / config["file"]).is_file(), config
    for secret in stack["secrets"].values():
        assert secret["file"].startswith("./secrets/"), secret  # made by the operator, ignored
    assert "deploy/shore/secrets/" in (ROOT / ".gitignore").read_text().splitlines()

    receiver = services["receiver"]
    # The appliance's own image: its ENTRYPOINT is `appliance`, so the command is the CLI's.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["appliance"]' in dockerfile
    (mount,) = receiver["configs"]
    assert receiver["command"] == ["receiver", "-c", mount["target"]]
    cfg = load_receiver_config(SHORE / "receiver.yaml")
    port = int(cfg.listen.rsplit(":", 1)[1])
    assert receiver["environment"]["APPLIANCE_HEALTHCHECK_URL"] == (
        f"http://127.0.0.1:{port}/healthz"
    )
    # The receiver reads its secrets where compose mounts them.
    secrets = {f"/run/secrets/{name}" for name in receiver["secrets"]}
    assert cfg.store.type == "postgres" and cfg.objects.type == "s3"
    for path in (cfg.store.database_file, cfg.objects.access_key_file, cfg.objects.secret_key_file):
        assert str(path) in secrets, path
    # The bucket the init job makes is the one the receivers use, on the store compose runs.
    assert f"shore/{cfg.objects.bucket}" in " ".join(services["bucket"]["command"])
    assert cfg.objects.endpoint_url == "http://minio:9000"
    # HAProxy balances over as many replicas as compose runs, on the receivers' port.
    haproxy = (SHORE / "haproxy.cfg").read_text()
    template = re.search(r"server-template receiver (\d+) receiver:(\d+)", haproxy)
    assert template is not None
    assert int(template[1]) == receiver["deploy"]["replicas"]
    assert int(template[2]) == port
    assert "option httpchk GET /v1/health" in haproxy
    (target,) = services["haproxy"]["configs"]
    assert target["target"] == "/usr/local/etc/haproxy/haproxy.cfg"
    (pem,) = services["haproxy"]["secrets"]
    assert pem["target"] in haproxy
    # The database and user the DSN secret names (docs/fleet.md) are the ones PostgreSQL makes.
    env = services["postgres"]["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("receiver", "fleet")
    assert (
        "postgresql://receiver:PASSWORD@postgres:5432/fleet"
        in (SHORE / "receiver.yaml").read_text()
    )
