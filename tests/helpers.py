"""Test helpers: config files, the appliance in a subprocess, polling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
import yaml

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


def fast_sensor(name: str, **overrides: Any) -> dict[str, Any]:
    """A simulated source producing ~20 windows/s, whose peak limit toggles often (alerts)."""
    sensor: dict[str, Any] = {
        "name": name,
        "type": "simulated",
        "sample_rate": 400,
        "window": "50ms",
        "pace": "realtime",
        "channels": [{"name": "vib", "signal": "vibration", "amplitude": 1.0, "noise": 0.3}],
        "limits": [{"feature": "peak", "above": 1.6, "priority": "alert"}],
    }
    sensor.update(overrides)
    return sensor


def write_config(
    path: Path, data_dir: Path, sensors: list[dict[str, Any]], **sections: Any
) -> Path:
    doc: dict[str, Any] = {
        "appliance": {"id": "test-01", "data_dir": str(data_dir), "health_interval": "2s"},
        "sensors": sensors,
        # Port 0: daemons of tests running side by side never fight over the default 8080.
        "status": {"listen": "127.0.0.1:0"},
    }
    for key, value in sections.items():
        doc.setdefault(key, {}).update(value) if isinstance(value, dict) else doc.__setitem__(
            key, value
        )
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def start_daemon(
    config: Path, log_path: Path, *args: str, command: str = "run"
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance", command, "-c", str(config), *args],
            stdout=log,
            stderr=log,
            env=cli_env(),
            cwd=ROOT,
        )


def log_events(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def wait_until(predicate: Callable[[], object], what: str, within_s: float = 60) -> None:
    """Until `predicate()` holds, looked at every 10 ms on the event loop; fails naming `what`
    after `within_s` (a bound for a stuck test, not a timing the test checks)."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.01)


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def status_json(config: Path) -> dict[str, Any]:
    result = run_cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def component_missing(what: str) -> NoReturn:
    """A component a test needs (a server binary, a test asset) is not here: under CI=true, where
    `make test` installs everything, that fails the test; elsewhere it skips it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing")
    pytest.skip(f"{what} is missing")


def wrong_clock_env(offset: str, **extra: str) -> dict[str, str]:
    """`cli_env()` for a process whose wall clock is `offset` off (libfaketime, Debian package
    faketime: "+10m", "-2d"); its monotonic clock stays true, as on a machine without NTP."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not found:
        component_missing("libfaketime (Debian package faketime)")
    return cli_env(
        LD_PRELOAD=str(found[0]), FAKETIME=offset, FAKETIME_DONT_FAKE_MONOTONIC="1", **extra
    )


@contextlib.contextmanager
def receiver_process(args: list[str], folder: Path) -> Iterator[tuple[str, Path]]:
    """`appliance receiver ARGS` in a subprocess: (its URL, once it printed it, and its log
    file). Stopped with SIGTERM on the way out, which must end it cleanly (exit 0)."""
    out, log = folder / "receiver.stdout", folder / "receiver.stderr"
    with out.open("wb") as stdout, log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "receiver", *args],
            stdout=stdout,
            stderr=stderr,
            env=cli_env(),
            cwd=ROOT,
        )
    try:
        line = wait_for(
            lambda: next((x for x in out.read_text().splitlines() if "listening on" in x), None),
            20,
            "the receiver to print its address",
        )
        yield line.rsplit(" ", 1)[1], log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
