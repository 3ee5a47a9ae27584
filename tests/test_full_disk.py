"""A real full disk: the daemon runs on a small tmpfs that really fills (ENOSPC). It survives,
evicts in priority order, reports itself degraded, and recovers by itself when space returns."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    component_missing,
    fast_sensor,
    start_daemon,
    status_json,
    stop_daemon,
    wait_for,
    write_config,
)

FS_SIZE_MIB = 24


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real, tiny file system (tmpfs) mounted for this test only. Needs root; CI runs as root,
    and under CI=true a missing capability is a failure, not a skip."""
    if os.geteuid() != 0:
        component_missing("root, to mount a tmpfs for the full-disk test (CI runs as root),")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE_MIB}m", "tmpfs", str(mount_point)],
        check=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(path: Path, limit: int | None = None) -> int:
    """Write zeros until ENOSPC (or `limit` bytes); return bytes written."""
    written = 0
    chunk = b"\0" * 65536
    try:
        # Unbuffered: a buffered file would try to flush its last chunk again on close, and that
        # second ENOSPC would escape the `with`.
        handle = path.open("ab", buffering=0)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        return 0  # so full that not even an empty file fits: that is the point
    with handle:
        while limit is None or written < limit:
            try:
                written += handle.write(chunk) or 0
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        with contextlib.suppress(OSError):
            os.fsync(handle.fileno())
    return written


def _query(data: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(f"{(data / 'journal.db').as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.root
def test_daemon_survives_a_really_full_disk(small_fs: Path, tmp_path: Path) -> None:
    data = small_fs / "data"
    big_samples = {"sample_rate": 20000, "window": "50ms", "sample_raw_every": 1}
    config = write_config(
        tmp_path / "c.yaml",
        data,
        [fast_sensor("a", **big_samples), fast_sensor("b", **big_samples), fast_sensor("c")],
        storage={
            "disk_budget": "1GiB",
            "min_free": "3MiB",
            "reserve": "1MiB",
            "check_interval": "500ms",
        },
        appliance={"health_interval": "1s"},
    )
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    hog = small_fs / "someone-elses-file"
    try:
        wait_for(
            lambda: (
                (data / "journal.db").exists()
                and status_json(config)["records"]["by_kind"].get("sample", 0) > 5
            ),
            30,
            "samples on the small disk",
        )
        alerts_before = {
            seq for (seq,) in _query(data, "SELECT seq FROM records WHERE priority = 1")
        }
        # Another process takes most of what is left; the daemon's own writes then fill the rest.
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        _fill(hog, limit=max(0, free - 6 * 1024 * 1024))

        def degraded() -> dict[str, Any] | None:
            report = status_json(config)
            daemon = report["daemon"]
            return (
                report
                if daemon.get("running") and "disk_full" in daemon.get("reasons", [])
                else None
            )

        report = wait_for(degraded, 60, "the daemon to report disk_full", interval=0.3)
        # Now take the very last byte: the daemon's next writes meet a real ENOSPC.
        _fill(small_fs / "last-bytes")
        time.sleep(3)
        assert proc.poll() is None, "the daemon died on a full disk"
        report = wait_for(degraded, 30, "degraded while full", interval=0.3)

        evictions = {(e["priority"], e["reason"]): e["records"] for e in report["evictions"]}
        assert evictions.get(("telemetry", "disk_full"), 0) > 0, evictions
        # Unsynced alerts are never evicted while lower priorities remain.
        assert not any(p == "alert" for p, _ in evictions), evictions
        alerts_now = {seq for (seq,) in _query(data, "SELECT seq FROM records WHERE priority = 1")}
        assert alerts_before <= alerts_now
        # Shedding is visible: records the daemon could not take are counted, not silently lost.
        eviction_records = [
            json.loads(str(b))
            for (b,) in _query(data, "SELECT body FROM records WHERE kind = 'eviction'")
        ]
        assert eviction_records, "evictions are journalled as records of their own"
        # An event is evicted only once no unsynced telemetry or sample older than it remains
        # (the unit tests in test_retention.py check the order pass by pass).
        event_passes = _query(
            data,
            "SELECT seq FROM records WHERE kind = 'eviction' AND "
            "(json_extract(body, '$.evicted.event') IS NOT NULL)",
        )
        for (pass_seq,) in event_passes:
            older_low = _query(
                data, f"SELECT COUNT(*) FROM records WHERE priority IN (3, 4) AND seq < {pass_seq}"
            )[0][0]
            assert older_low == 0, (
                f"event evicted while {older_low} older lower-priority records remained"
            )

        # Space returns: the daemon recovers by itself and takes telemetry again.
        (small_fs / "last-bytes").unlink()
        hog.unlink()
        last_seq = int(_query(data, "SELECT MAX(seq) FROM records")[0][0])

        def recovered() -> bool:
            daemon = status_json(config)["daemon"]
            return bool(daemon.get("running")) and daemon.get("state") == "ok"

        wait_for(recovered, 60, "recovery after space returned", interval=0.3)
        wait_for(
            lambda: _query(
                data, f"SELECT COUNT(*) FROM records WHERE kind = 'reading' AND seq > {last_seq}"
            )[0][0],
            30,
            "telemetry accepted again",
        )
        assert stop_daemon(proc, timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _query(data, "PRAGMA integrity_check") == [("ok",)]
    drops = dict(
        ((p, r), n) for p, r, n in _query(data, "SELECT priority, reason, records FROM drops")
    )
    assert drops.get((4, "disk_full"), 0) > 0, f"shed telemetry is counted: {drops}"
