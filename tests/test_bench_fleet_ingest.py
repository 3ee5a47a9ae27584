"""bench.fleet_ingest runs end to end at a tiny size against every setup (SQLite; PostgreSQL with
SeaweedFS; three replicas behind HAProxy) and prints one JSON object whose stores hold every
record and payload sent exactly once; its fleet plan follows the profiles and the engine's
batching."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

from bench.fleet_ingest import PROFILES, missing_components, plan_fleet, workload
from config.shipping import SyncSection
from tests.helpers import component_missing

ROOT = Path(__file__).resolve().parents[1]


def test_a_tiny_fleet_is_stored_exactly_once_everywhere(tmp_path: Path) -> None:
    missing = missing_components(["sqlite", "postgres", "postgres_x3"])
    if missing:
        component_missing("; ".join(missing))  # fails under CI=true, skips elsewhere
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fleet_ingest",
            "--quick",
            "--clients=12",
            "--payload-fraction=0.01",
            f"--tmp-dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["ok"] is True, done.stdout
    assert set(result["setups"]) == {"sqlite", "postgres", "postgres_x3"}
    records = result["workload"]["records"]
    assert records == 12 * 1000  # one full batch per client
    for name, setup in result["setups"].items():
        once = setup["exactly_once"]
        assert once["ok"] is True, (name, once)
        assert once["records_stored"] == records
        assert once["records_stored_twice"] == 0
        assert once["payload_rows"] == result["workload"]["payloads"] > 0
        assert setup["records_per_s"] > 0
        assert setup["ack_latency_s"]["count"] == result["workload"]["batches"]
        assert setup["ack_latency_s"]["p99"] >= setup["ack_latency_s"]["p50"] > 0
        assert setup["cpu"]["seconds"]["clients"] >= 0
        assert setup["cpu"]["seconds"]["receiver" if name != "postgres_x3" else "receiver-0"] > 0
    assert result["setups"]["postgres"]["cpu"]["seconds"]["postgres"] > 0
    assert "haproxy" in result["setups"]["postgres_x3"]["cpu"]["seconds"]
    limit = result["limit"]
    assert limit["stored"] == limit["records"] == records
    assert limit["tables"] == ["record_keys", "records"]
    assert result["ratio_to_limit"]["postgres"] > 0
    assert set(result["pass"]) >= {"ratio_postgres", "p99_ack_sqlite", "all"}
    assert list(tmp_path.iterdir()) == []  # the data dir is removed


def test_the_fleet_plan_follows_the_profiles_and_the_engine_batches() -> None:
    args = Namespace(clients=6, batches=2, payload_fraction=0.05, ramp=1.0, seed=3)
    settings = SyncSection()
    plans, _ = plan_fleet(args, settings)
    assert [p.profile for p in plans] == ["turbine", "ship", "camera"] * 2
    for plan in plans:
        batches = plan.batches
        assert len(batches) == 2
        kinds = {k.kind: k for k in PROFILES[plan.profile]}
        assert set(plan.kinds) <= set(kinds)
        # The engine's order: a priority's batches, then that priority's payloads.
        priorities = [b.priority for b in batches]
        assert priorities == sorted(priorities, key=["alert", "event", "sample", "telemetry"].index)
        for batch in batches:
            assert batch.records == len(batch.seqs) <= settings.batch_records
            assert batch.batch_id == f"{batch.priority}-{batch.seqs[0]}-{batch.seqs[-1]}"
            assert list(batch.seqs) == sorted(set(batch.seqs))
    # Turbines and cameras start with alerts (anomalies; zone entries and clips), ships have none.
    assert plans[0].batches[0].priority == "alert"
    assert plans[1].batches[0].priority == "telemetry"
    assert plans[2].batches[0].priority == "alert"
    assert plans[2].payloads  # a camera's alerts carry clips and snapshots
    work = workload(plans)
    assert work["records"] == sum(len(b.seqs) for p in plans for b in p.batches)
    assert work["payload_bytes"] == sum(len(s.data) for p in plans for s in p.payloads)
    again, _ = plan_fleet(args, settings)  # the same seed, the same fleet (but for the times)
    assert [b.batch_id for p in again for b in p.batches] == [
        b.batch_id for p in plans for b in p.batches
    ]
