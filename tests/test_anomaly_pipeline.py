"""The turbine case end to end through `appliance replay`: a baseline fitted on the device from
the first healthy running, injected faults (imbalance, bearing impulses, drift) found with the raw
samples around them kept, healthy running left alone, and a restart scoring with the saved
baseline instead of fitting a new one."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sync.payloads import PayloadStore
from sync.reader import JournalReader
from tests.helpers import run_cli, write_config

BASELINE_S = 120


def gearbox(duration_s: int, faults: list[dict[str, Any]], **anomaly: Any) -> dict[str, Any]:
    return {
        "name": "gearbox",
        "type": "simulated",
        "sample_rate": 2000,
        "window": "1s",
        "pace": "fast",
        "duration": f"{duration_s}s",
        "seed": 7,
        "channels": [
            {"name": "hss_axial", "signal": "vibration", "amplitude": 0.5, "frequency": 25.0},
            {"name": "hss_radial", "signal": "vibration", "amplitude": 0.6, "frequency": 25.0},
        ],
        "faults": faults,
        "anomaly": {
            "method": "hotelling",
            "baseline": f"{BASELINE_S}s",
            "raw_windows": [2, 2],
            **anomaly,
        },
    }


def records(data_dir: Path, kind: str) -> list[dict[str, Any]]:
    with JournalReader.open(data_dir) as reader:
        return [r.to_dict() for r in reader.iter_records(kind=kind)]


def seconds_in(record: dict[str, Any], first_reading_ts: str) -> float:
    from datetime import datetime

    def parse(ts: str) -> datetime:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))

    return (parse(record["ts"]) - parse(first_reading_ts)).total_seconds()


def replay(tmp_path: Path, name: str, sensor: dict[str, Any], data_dir: Path | None = None) -> Path:
    data = data_dir or tmp_path / name
    config = write_config(tmp_path / f"{name}.yaml", data, [sensor])
    result = run_cli("replay", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return data


FAULTS: dict[str, dict[str, Any]] = {
    "imbalance": {
        "kind": "imbalance",
        "channel": "hss_axial",
        "start": "200s",
        "duration": "40s",
        "magnitude": 0.6,
    },
    "bearing": {
        "kind": "bearing",
        "channel": "hss_radial",
        "start": "280s",
        "duration": "40s",
        "magnitude": 1.5,
    },
    "drift": {
        "kind": "drift",
        "channel": "hss_axial",
        "start": "360s",
        "duration": "40s",
        "magnitude": 1.5,
    },
}


@pytest.fixture(scope="module")
def turbine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("turbine")
    return replay(tmp, "faults", gearbox(440, list(FAULTS.values())))


def test_the_baseline_is_fitted_on_the_device_and_stamped_on_readings(turbine: Path) -> None:
    (fitted,) = records(turbine, "baseline")
    body = fitted["body"]
    assert body["state"] == "fitted" and body["method"] == "hotelling"
    assert BASELINE_S - 2 <= body["windows"] <= BASELINE_S + 2
    assert "hss_axial.kurtosis" in body["features"] and "hss_radial.rms" in body["features"]
    model = f"gearbox-baseline@{body['version']}"
    assert fitted["model"] == model
    readings = records(turbine, "reading")
    assert readings[0]["model"] is None  # before the baseline existed
    assert readings[-1]["model"] == model
    saved = turbine / "models" / "baselines" / "gearbox" / f"{body['version']}.npz"
    assert saved.is_file()
    # The health record at the stop shows the stage scoring with it, and what it found.
    health = records(turbine, "health")[-1]["body"]["sources"]["gearbox"]
    assert health["anomaly"]["state"] == "scoring" and health["anomaly"]["model"] == model
    assert health["anomaly"]["anomalies"] == len(FAULTS)
    assert health["anomaly"]["threshold"] == pytest.approx(body["threshold"])
    assert health["last_reading_age_s"] is not None


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_injected_fault_is_an_anomaly_with_its_raw_windows(turbine: Path, fault: str) -> None:
    first = records(turbine, "reading")[0]["ts"]
    start = float(FAULTS[fault]["start"].rstrip("s"))
    end = start + float(FAULTS[fault]["duration"].rstrip("s"))
    started = [
        r
        for r in records(turbine, "anomaly")
        if r["body"]["kind"] == "started" and start <= seconds_in(r, first) <= end
    ]
    assert started, f"the {fault} fault went unnoticed"
    anomaly = started[0]
    # Detection delay: the debounce needs 2 of 3 windows over the threshold.
    assert seconds_in(anomaly, first) - start <= 8
    assert anomaly["priority"] in ("event", "alert")
    assert anomaly["model"].startswith("gearbox-baseline@")
    assert anomaly["body"]["features"], "no contributing feature named"
    (raw,) = [
        r for r in records(turbine, "anomaly_window") if r["body"]["anomaly_seq"] == anomaly["seq"]
    ]
    assert raw["priority"] == anomaly["priority"]
    (sha,) = raw["payloads"]
    with np.load(io.BytesIO(PayloadStore(turbine / "payloads").read(sha))) as npz:
        # Two windows before, the one it began in, two after: 5 s at 2 kHz on both channels.
        assert npz["values"].shape == (2, 5 * 2000)
        assert list(npz["channels"]) == ["hss_axial", "hss_radial"]
        assert int(npz["anomaly_window"]) == 2
        assert npz["times_s"][-1] == pytest.approx(5.0 - 1 / 2000)


def test_healthy_running_between_faults_raises_nothing(turbine: Path) -> None:
    first = records(turbine, "reading")[0]["ts"]
    early = [
        r
        for r in records(turbine, "anomaly")
        if r["body"]["kind"] == "started" and seconds_in(r, first) < 200
    ]
    assert early == []


def test_a_long_healthy_run_raises_no_alert_and_a_restart_keeps_the_baseline(
    tmp_path: Path,
) -> None:
    data = replay(tmp_path, "healthy", gearbox(1200, []))
    assert [r for r in records(data, "anomaly") if r["body"]["kind"] == "started"] == []
    (fitted,) = records(data, "baseline")
    # A second run on the same data directory scores with the saved baseline from its first
    # window: no new fit, the same version on its readings.
    replay(tmp_path, "again", gearbox(60, []), data_dir=data)
    assert len(records(data, "baseline")) == 1
    model = f"gearbox-baseline@{fitted['body']['version']}"
    assert all(r["model"] == model for r in records(data, "reading")[-60:])


def test_windows_with_bad_input_are_never_fitted_into_the_baseline(tmp_path: Path) -> None:
    dropout = {
        "kind": "dropout",
        "channel": "hss_axial",
        "start": "10s",
        "duration": "30s",
        "magnitude": 0.01,
    }
    data = replay(tmp_path, "dropout", gearbox(BASELINE_S + 60, [dropout]))
    (fitted,) = records(data, "baseline")
    # The 30 windows with missing samples were left out, so the fit waited for clean ones.
    assert fitted["body"]["windows"] <= BASELINE_S - 25
    quality = records(data, "data_quality")
    assert quality and quality[0]["model"] is None  # the baseline was not fitted yet
    # After the fit every record of the source carries the baseline, not only its readings.
    model = f"gearbox-baseline@{fitted['body']['version']}"
    assert records(data, "reading")[-1]["model"] == model


def test_fit_baseline_on_recorded_readings_then_score_with_it(tmp_path: Path) -> None:
    # Readings only: the baseline period is longer than the recording, so nothing is fitted.
    data = tmp_path / "data"
    config = write_config(tmp_path / "c.yaml", data, [gearbox(150, [], baseline="1h")])
    assert run_cli("replay", "-c", str(config)).returncode == 0
    assert records(data, "baseline") == []

    fitted = run_cli("models", "fit-baseline", "gearbox", "-c", str(config))
    assert fitted.returncode == 0, fitted.stderr
    assert "hotelling on 150 windows" in fitted.stdout
    version = fitted.stdout.split("gearbox-baseline@")[1].split(",")[0]

    # The next run scores with it from its first window: the imbalance is found at once.
    imbalance = {**FAULTS["imbalance"], "start": "20s"}
    config = write_config(tmp_path / "c.yaml", data, [gearbox(60, [imbalance], baseline="1h")])
    assert run_cli("replay", "-c", str(config)).returncode == 0
    assert records(data, "baseline") == []
    readings = records(data, "reading")[150:]
    assert readings and all(r["model"] == f"gearbox-baseline@{version}" for r in readings)
    assert any(r["body"]["kind"] == "started" for r in records(data, "anomaly"))

    for bad, says in (
        (["nobody"], "no sensor source 'nobody'"),
        (["gearbox", "--until", "soonish"], "--until 'soonish'"),
    ):
        result = run_cli("models", "fit-baseline", *bad, "-c", str(config))
        assert result.returncode == 2 and says in result.stderr
    empty = run_cli("models", "fit-baseline", "gearbox", "-c", str(config), "--until", "2000-01-01")
    assert empty.returncode == 1 and "no clean readings" in empty.stderr


def test_a_replay_scores_every_window_after_the_baseline_even_while_a_slow_fit_runs(
    tmp_path: Path,
) -> None:
    # An isolation forest takes seconds to fit and export; a fast replay brings hundreds of
    # windows in that time, and each must still be scored.
    data = replay(tmp_path, "forest", gearbox(180, [], method="isolation_forest", baseline="60s"))
    (fitted,) = records(data, "baseline")
    stage = records(data, "health")[-1]["body"]["sources"]["gearbox"]["anomaly"]
    assert stage["skipped"] == 0
    assert stage["baseline_windows"] + stage["scored"] == 180
    assert stage["scored"] == 180 - fitted["body"]["windows"]


def test_a_dead_and_a_frozen_sensor_are_left_out_and_named_while_the_rest_scores(
    tmp_path: Path,
) -> None:
    """A well in the shape of the 3W data: two live pressures that move together, a gauge that
    reports nothing (empty CSV fields) and one frozen at 0. Before, every window had bad input
    and nothing was ever fitted; now the two are left out with a data-quality record naming them
    and the live pair scores, and alarms when its pressure steps."""
    rng = np.random.default_rng(5)
    seconds = 900
    load = np.cumsum(rng.normal(0.0, 0.02, seconds))  # a slowly wandering operating point
    upstream = 180.0 + load + rng.normal(0.0, 0.05, seconds)
    downstream = 120.0 + 0.8 * load + rng.normal(0.0, 0.05, seconds)
    upstream[700:] += 3.0  # the choke restricted: the upstream pressure steps up
    lines = ["timestamp,p_up,p_down,p_dead,p_frozen"]
    for second in range(seconds):
        lines.append(f"{1.7e9 + second},{upstream[second]:.4f},{downstream[second]:.4f},,0")
    csv_path = tmp_path / "well.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    sensor = {
        "name": "well",
        "type": "csv",
        "path": str(csv_path),
        "timestamp_format": "epoch_s",
        "window": "5s",
        "anomaly": {"baseline": "600s", "false_alarms_per_day": 1},
    }
    data = replay(tmp_path, "well", sensor)

    (fitted,) = records(data, "baseline")
    excluded = fitted["body"]["excluded"]
    assert excluded == {
        **{f"p_dead.{f}": "missing" for f in ("max", "mean", "min", "peak", "rms", "slope")},
        **{f"p_frozen.{f}": "frozen" for f in ("max", "mean", "min", "peak", "rms", "slope")},
    }
    model = f"well-baseline@{fitted['body']['version']}"
    left_out = [r for r in records(data, "data_quality") if r["body"].get("excluded")]
    assert len(left_out) == 1 and left_out[0]["model"] == model
    body = left_out[0]["body"]
    assert body["counts"] == {"baseline_missing": 6, "baseline_frozen": 6}
    assert any("p_dead.mean" in e["detail"] for e in body["examples"])

    anomalies = [r for r in records(data, "anomaly") if r["body"]["kind"] == "started"]
    assert anomalies, "the step of the live pressure was not found"
    first = seconds_in(anomalies[0], records(data, "reading")[0]["ts"])
    assert 700 - 5 <= first <= 700 + 30
    assert all(
        f["name"].split(".")[0] in ("p_up", "p_down") for f in anomalies[0]["body"]["features"]
    )
    stage = records(data, "health")[-1]["body"]["sources"]["well"]["anomaly"]
    assert stage["state"] == "scoring" and stage["scored"] > 0
