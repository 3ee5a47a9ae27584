"""A real PostgreSQL server for tests (Debian package postgresql): a throwaway cluster made with
initdb in a temp folder, listening on a free port on 127.0.0.1, stopped (or killed, or
restarted on the same port) by the test. As root the server runs as `nobody` (PostgreSQL
refuses to run as root), through util-linux `setpriv`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path

from tests.helpers import component_missing
from tests.mosquitto import free_port

WAIT_S = 30.0


def postgres_bin() -> Path:
    """The newest installed server's bin folder (Debian: /usr/lib/postgresql/N/bin)."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    if not versions:
        component_missing("PostgreSQL server (Debian package postgresql)")
    return versions[-1].parent


def _as_server_user() -> list[str]:
    if os.getuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        component_missing("setpriv (util-linux), to run PostgreSQL as nobody")
    return [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


class PostgresServer:
    """One cluster: `start()`, `stop()`, `kill()` (SIGKILL: a crash), `dsn`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.port = free_port()
        self.bin = postgres_bin()
        self.prefix = _as_server_user()
        directory.mkdir(parents=True, exist_ok=True)
        if self.prefix:
            shutil.chown(directory, "nobody", "nogroup")
        directory.chmod(0o700)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.prefix, str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise AssertionError(f"{tool} failed: {done.stdout}{done.stderr}")
        return done

    def start(self) -> None:
        """Start the server (again); after a kill, until its old backends have gone."""
        options = (
            f"-k {self.directory} -p {self.port} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200 -c shared_buffers=64MB "
            "-c log_line_prefix='%m [%p] '"
        )
        command = [*self.prefix, str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options]
        deadline = time.monotonic() + WAIT_S
        while True:
            done = subprocess.run(
                [*command, "-l", str(self.log), "-w", "start"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode == 0:
                return
            # Backends of a killed server still hold its shared memory for a moment.
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"PostgreSQL did not start: {done.stdout}{done.stderr}{self.log.read_text()}"
                )
            time.sleep(0.1)

    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        with suppress(OSError, ValueError):
            return int(pidfile.read_text().split()[0])
        return None

    def stop(self) -> None:
        """A clean shutdown (fast mode: open connections are ended)."""
        if self.pid() is not None:
            subprocess.run(
                [
                    *self.prefix,
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ],
                capture_output=True,
                timeout=120,
            )

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash: the next start recovers from the WAL), and wait
        until the port refuses connections."""
        pid = self.pid()
        if pid is None:
            return
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            except OSError:
                return
            time.sleep(0.05)
        raise AssertionError(f"PostgreSQL still listens on {self.port} after SIGKILL")


def create_database(server: PostgresServer, name: str) -> str:
    """A fresh database on `server`; its DSN."""
    done = subprocess.run(
        [
            str(server.bin / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(server.port),
            "-U",
            "postgres",
            "-c",
            f'CREATE DATABASE "{name}"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise AssertionError(f"CREATE DATABASE {name} failed: {done.stderr}")
    return f"postgresql://postgres@127.0.0.1:{server.port}/{name}"
