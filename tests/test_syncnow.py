"""`appliance sync --now`: drains with a progress bar, alone or through the running daemon."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from appliance.syncnow import ProgressBar, _follow
from config.units import format_size
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


def bar_lines(stderr: str, destination: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{destination}: [")]


def test_the_estimate_counts_payloads_and_every_bar_ends_at_100(tmp_path: Path) -> None:
    # Before: the estimate left out the payloads of records not yet shipped (they join the
    # outbox with the acknowledgement): `699.5 KiB of ~47.2 KiB`, and `status` said 0 payloads
    # waiting. Sent bytes (gzip) were measured against journal bytes, so a bar stopped short of
    # the end, and with two destinations the first one's line was never finished.
    config = replayed(
        tmp_path,
        interval="1h",
        destinations=[
            {"name": "usb", "type": "directory", "path": "outbox"},
            {"name": "nas", "type": "directory", "path": "nas"},
        ],
    )
    files = [p for p in (tmp_path / "data" / "payloads").glob("??/*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert files
    before = status_json(config)["destinations"]
    assert (before["usb"]["payloads_waiting"], before["usb"]["payload_bytes_waiting"]) == (
        len(files),
        size,
    )
    records = before["usb"]["backlog_records"]
    result = run_cli("sync", "--now", "-c", str(config))
    assert result.returncode == 0, result.stderr
    for name in ("usb", "nas"):
        lines = bar_lines(result.stderr, name)
        assert len(lines) >= 2, result.stderr
        estimate = f"0/{records} records, 0/{len(files)} payloads (0 B of ~{format_size(size)})"
        assert estimate in lines[0], lines[0]
        shipped = f"{records}/{records} records, {len(files)}/{len(files)} payloads"
        assert "[####################] 100%" in lines[-1] and shipped in lines[-1], lines[-1]
        assert f"({format_size(size)} of {format_size(size)})" in lines[-1] and "took" in lines[-1]
    assert status_json(config)["destinations"]["nas"]["payloads_waiting"] == 0


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_on_a_terminal_each_destination_keeps_its_finished_line() -> None:
    async def lines() -> AsyncIterator[dict[str, Any]]:
        for name in ("usb", "nas"):
            for done in (0, 4, 9):  # the estimate said 10; 9 was all there was
                yield {
                    "destination": name,
                    "records": done,
                    "records_total": 10,
                    "record_bytes_total": 1000,
                    "payloads": 0,
                    "payloads_total": 0,
                    "payload_bytes": 0,
                    "payload_bytes_total": 0,
                    "bytes": done * 40,
                    "rate_bytes_per_s": 400.0,
                    "elapsed_s": done / 10,
                }
        yield {"done": True, "drained": True, "reason": None, "warnings": []}

    out = Terminal()
    assert await _follow(lines(), ProgressBar(out)) == (True, None)
    # What stays on the screen: each line as its last redraw left it.
    screen = [line.rsplit("\r", 1)[-1].rstrip() for line in out.getvalue().split("\n") if line]
    assert [line.split(":")[0] for line in screen] == ["usb", "nas"]
    assert all("] 100% 9/9 records" in line and "took 900ms" in line for line in screen), screen


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
        assert "100%" in bar_lines(result.stderr, "usb")[-1], result.stderr
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
