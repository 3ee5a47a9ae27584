"""bench.anomaly_shape's quick run: KDD-TSAD_135's 12-sample anomaly is invisible to the slow
features at the default threshold and found by the shape features; their CPU is measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.anomaly_datasets import aeon_data_dir
from tests.helpers import component_missing

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_shows_what_the_shape_features_find_and_cost() -> None:
    if aeon_data_dir() is None:
        component_missing("the aeon wheel (its bundled anomaly datasets)")
    done = subprocess.run(
        [sys.executable, "-m", "bench.anomaly_shape", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["features_per_window"] == {"slow": 6, "vibration": 14}
    hotelling = {
        kind: result["results"][kind]["off"]["hotelling"] for kind in ("slow", "vibration")
    }
    assert hotelling["slow"]["detected"] is False
    assert hotelling["vibration"]["detected"] is True
    assert hotelling["vibration"]["anomalies_elsewhere"] == 0
    # The cost is measured and recorded (docs/benchmarks.md), not judged here: timings are noisy.
    assert set(result["summarise_us_per_window"]) == {"slow", "vibration"}
