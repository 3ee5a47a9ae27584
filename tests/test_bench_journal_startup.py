"""bench.journal_startup runs end to end at a tiny size and prints one JSON object: the clean
restart scanned nothing (neither pages nor payload files), the journal at the limit was checked
in full, the unclean restart reconciled payloads and its background check passed, and the
daemon reached its first record."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_tiny_run_prints_one_json_object_that_passes() -> None:
    # Not pytest's tmp_path: the daemon's control socket goes in the data dir, and a path that
    # deep is over AF_UNIX's length limit.
    with tempfile.TemporaryDirectory(prefix="js-") as parent:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.journal_startup",
                "--gib=0.01",
                "--full-check-limit-mib=4",
                "--payload-files=200",
                "--restarts=1",
                f"--tmp-dir={parent}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert list(Path(parent).iterdir()) == []  # the data is deleted at the end
    result = json.loads(done.stdout)
    assert result["pass"]["all"] is True, done.stdout
    assert result["baseline_old_quick_check"]["result"] == "ok"
    cold = result["clean_restarts"][0]
    assert (cold["check"], cold["last_stop"], cold["integrity"]) == ("sanity", "clean", "skipped")
    assert set(cold["steps_s"]) == {"check", "migrate", "identity", "seqs"}
    assert result["at_full_check_limit"]["check"] == "integrity_check"
    unclean = result["unclean_restart"]
    assert unclean["found_at_open"] == {"last_stop": "unclean", "state": "pending"}
    assert "payloads" in unclean["steps_s"]
    assert unclean["background_check"]["state"] == "ok"
    assert unclean["append_ms_during_check"]["appends"] >= 1
    assert result["daemon"]["first_records_s"]["lifecycle"] > 0
    for figures in result["status_reads_cold_s"].values():
        assert not any(read["interrupted"] for read in figures.values())
