"""`appliance sync --now`: drains with a progress bar, alone or through the running daemon."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.helpers import (
    fast_sensor,
    run_cli,
    start_daemon,
    status_json,
    stop_daemon,
    wait_for,
    write_config,
)


def usb(path: str = "outbox", **extra: Any) -> dict[str, Any]:
    return {
        "interval": "1h",
        "destinations": [{"name": "usb", "type": "directory", "path": path, **extra}],
    }


def replayed(tmp_path: Path, **sync: Any) -> Path:
    config = write_config(
        tmp_path / "c.yaml",
        tmp_path / "data",
        [fast_sensor("a", duration="2s", pace="fast", sample_raw_every=4)],
        sync=sync,
    )
    assert run_cli("replay", "-c", str(config)).returncode == 0
    return config


def test_sync_now_without_a_daemon_drains_everything(tmp_path: Path) -> None:
    config = replayed(tmp_path, **usb())
    result = run_cli("sync", "--now", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "usb:" in result.stderr and "records" in result.stderr and "drained" in result.stderr
    report = status_json(config)
    assert report["destinations"]["usb"]["backlog_records"] == 0
    assert report["destinations"]["usb"]["payloads_waiting"] == 0
    assert list((tmp_path / "data" / "outbox").glob("records/test-01/*/telemetry/*.manifest.json"))


def test_sync_now_asks_the_running_daemon(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "c.yaml", data, [fast_sensor("a", sample_raw_every=5)], sync=usb()
    )
    proc = start_daemon(config, tmp_path / "d.log")
    try:
        wait_for(
            lambda: (
                (data / "control.sock").exists()
                and status_json(config)["destinations"]["usb"]["backlog_records"] > 30
            ),
            30,
            "a backlog",
        )
        result = run_cli("sync", "--now", "-c", str(config), "--destination", "usb")
        assert result.returncode == 0, result.stderr
        assert "drained" in result.stderr
        # It went through the daemon: the daemon's own engine counted what was shipped.
        wait_for(
            lambda: status_json(config)["daemon"]["destinations"]["usb"]["records_sent"] > 30,
            15,
            "the daemon's heartbeat to show what it shipped",
            interval=0.5,
        )
    finally:
        assert stop_daemon(proc) == 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    config = replayed(tmp_path, **usb())
    unknown = run_cli("sync", "--now", "-c", str(config), "--destination", "nope")
    assert unknown.returncode == 2 and "no destination named 'nope'" in unknown.stderr
    none = write_config(tmp_path / "none.yaml", tmp_path / "data", [])
    assert run_cli("sync", "--now", "-c", str(none)).returncode == 2


def test_unreachable_or_slow_destinations_exit_1_with_the_reason(tmp_path: Path) -> None:
    config = replayed(tmp_path, **usb(str(tmp_path / "not-mounted"), require_mount=True))
    (tmp_path / "not-mounted").mkdir()
    result = run_cli("sync", "--now", "-c", str(config))
    assert result.returncode == 1 and "not finished" in result.stderr and "usb" in result.stderr
    slow = write_config(
        tmp_path / "slow.yaml", tmp_path / "data", [], sync=usb("slow-outbox", bandwidth="2KiB/s")
    )
    started = time.monotonic()
    result = run_cli("sync", "--now", "-c", str(slow), "--timeout", "2")
    assert result.returncode == 1 and "timed out after 2 s" in result.stderr
    assert time.monotonic() - started < 20
