"""A real HAProxy for tests (Debian package haproxy): round-robin over receiver replicas on
127.0.0.1, with health checks on /v1/health so a killed replica is taken out and a restarted one
put back, as a shore side's load balancer does."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path

from tests.helpers import component_missing
from tests.mosquitto import free_port

WAIT_S = 10.0


class LoadBalancer:
    """`haproxy -db` (foreground) in front of `backends` (ports on 127.0.0.1)."""

    def __init__(self, directory: Path, backends: list[int]) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            component_missing("HAProxy (Debian package haproxy)")
        self.binary = binary
        self.port = free_port()
        self.config = directory / "haproxy.cfg"
        self.log = directory / "haproxy.log"
        servers = "\n".join(
            f"    server r{n} 127.0.0.1:{port} check" for n, port in enumerate(backends)
        )
        self.config.write_text(
            f"""global
    maxconn 2000

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch

frontend shore
    bind 127.0.0.1:{self.port}
    default_backend receivers

backend receivers
    balance roundrobin
    option httpchk GET /v1/health
    default-server inter 200ms fall 1 rise 1
{servers}
"""
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited: {self.log.read_text()}")
            with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.02)
        raise AssertionError(f"haproxy did not listen on {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
