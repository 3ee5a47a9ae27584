"""Benchmark: sensor window features. Throughput of windowing + `summarise` (vibration features)
against a bare numpy loop computing the same features, and the CPU share of a realtime
simulated vibration source summarised in an asyncio loop.

  throughput  16 vibration channels at 10 kHz, 1 s windows (160,000 samples a window). The
              samples of a pool of windows are generated first by SimulatedSource.window_values
              (signal generation is not timed) and cycled through. Timed per window, as the
              simulated source and the pipeline do it: the missing-sample count the source keeps
              for its health, wrapping the array into a SampleWindow, `summarise` with
              FeatureSettings(kind="vibration") (default octave bands) and the anomaly scoring
              (`feature_vector` + `AnomalyDetector.observe`) with a Hotelling baseline fitted
              beforehand on FIT_WINDOWS other windows of the same source, on every feature of
              every channel (16 x 14); `--no-score` leaves the scoring out.
              baseline: `bare_features`, a per-window numpy function written here that computes
              the same features on the same arrays (no NaN handling, no overflow scaling, no
              rounding, no dicts; the Hann window and the band bin ranges are computed once,
              like summarise's cache). Checked to agree with summarise within rounding.
              Runs B P B P ... B: each pipeline run is compared with the mean of the baseline
              runs either side; the median ratio counts. Target: ratio >= 0.8.
              Reading the ratio: the bare loop allocates fresh megabyte temporaries each window,
              as straightforward numpy does, and glibc gives them back to the OS and
              page-faults them in again (see inference.features._Workspace); summarise reuses
              its buffers, so a ratio above 1 is expected. Run with MALLOC_TRIM_THRESHOLD_ and
              MALLOC_MMAP_THRESHOLD_ set to 1000000000 to compare the arithmetic alone.
  cpu         the real SimulatedSource (16 vibration channels, 10 kHz, 1 s windows, pace
              realtime) through `summarise` with the sensor's own settings (kind auto, which is
              vibration at 10 kHz) in an asyncio loop for --seconds. Process CPU time (all
              threads) / wall time, from the end of the first window on, so start-up is left
              out; the signal generation of the source is part of it, and the share spent in
              summarise (and the scoring) is reported beside it. Target: under 0.5 core.

Prints one JSON object on stdout; progress on stderr.
`python -m bench.sensor_throughput [--quick] [--windows N] [--rounds R] [--seconds S]`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import emit, machine, peak_rss_mib, progress
from config.analysis import AnomalySettings, FeatureSettings
from config.sensors import SimulatedSensor
from inference.anomaly import AnomalyDetector
from inference.anomaly_fit import fit_baseline
from inference.features import (
    Summary,
    default_bands,
    feature_names,
    feature_vector,
    summarise,
)
from sensors.base import SampleWindow, utc_now
from sensors.simulated import SimulatedSource

ROOT = Path(__file__).resolve().parent.parent
CHANNELS = 16
SAMPLE_RATE = 10_000.0
WINDOW_S = 1.0
TARGET_RATIO = 0.8
TARGET_CPU_CORES = 0.5
VIBRATION = FeatureSettings(kind="vibration")

FloatArray = npt.NDArray[np.float64]
Score = Callable[[Summary], object]
FIT_WINDOWS = 240  # windows the scoring's baseline is fitted on (not timed)


def sensor_config(pace: str) -> SimulatedSensor:
    """16 vibration channels at 10 kHz, 1 s windows: shafts at different speeds, amplitudes and
    noise levels, a bearing fault on one channel (impulses: a high kurtosis) and an imbalance on
    another, so the features are not all alike. No dropout: the baseline has no NaN handling."""
    channels = [
        {
            "name": f"vib_{index:02d}",
            "signal": "vibration",
            "amplitude": 0.5 + 0.1 * index,
            "frequency": 20.0 + 3.7 * index,
            "noise": 0.05 + 0.01 * index,
        }
        for index in range(CHANNELS)
    ]
    return SimulatedSensor.model_validate(
        {
            "name": "bench-vibration",
            "type": "simulated",
            "sample_rate": SAMPLE_RATE,
            "window": WINDOW_S,
            "pace": pace,
            "seed": 42,
            "channels": channels,
            "faults": [
                {"kind": "bearing", "channel": "vib_03", "magnitude": 2.0},
                {"kind": "imbalance", "channel": "vib_07", "magnitude": 1.0},
            ],
        }
    )


# ------------------------------------------------------------------------------ throughput


@dataclass(frozen=True)
class BareSpectrum:
    """What the bare loop computes once: the Hann window, bin frequencies, one-sided factors
    and each band's bin range [start, stop)."""

    hann: FloatArray
    freqs: FloatArray
    one_sided: FloatArray
    band_bins: tuple[tuple[int, int], ...]

    @classmethod
    def for_window(cls, samples: int, sample_rate: float) -> BareSpectrum:
        hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(samples) / samples)
        freqs = np.asarray(np.fft.rfftfreq(samples, d=1.0 / sample_rate), dtype=np.float64)
        one_sided = np.full(freqs.shape, 2.0)
        one_sided[0] = 1.0
        if samples % 2 == 0:
            one_sided[-1] = 1.0
        bins = []
        bands = default_bands(sample_rate)
        for index, (low, high) in enumerate(bands):
            start = int(np.searchsorted(freqs, low, side="left"))
            last = index == len(bands) - 1  # the top band holds the Nyquist bin
            stop = freqs.shape[0] if last else int(np.searchsorted(freqs, high, side="left"))
            bins.append((start, stop))
        return cls(hann, freqs, one_sided, tuple(bins))


def bare_features(values: FloatArray, spectrum: BareSpectrum) -> FloatArray:
    """The features of one window as channels x features, in the order of
    `feature_names("vibration", rate)`, in plain numpy."""
    mean = values.mean(axis=1)
    peak = np.abs(values).max(axis=1)
    rms = np.sqrt(np.mean(values * values, axis=1))
    deviation = values - mean[:, None]
    squared = deviation * deviation
    m2 = squared.mean(axis=1)
    m3 = (squared * deviation).mean(axis=1)
    m4 = (squared * squared).mean(axis=1)
    transform = np.fft.rfft(deviation * spectrum.hann, axis=1)
    power = (transform.real**2 + transform.imag**2) * spectrum.one_sided
    total = power.sum(axis=1)
    centroid = (power * spectrum.freqs).sum(axis=1) / total
    bands = [power[:, start:stop].sum(axis=1) / total * m2 for start, stop in spectrum.band_bins]
    return np.column_stack(
        [
            rms,
            peak,
            mean,
            values.min(axis=1),
            values.max(axis=1),
            peak / rms,
            m4 / (m2 * m2),
            m3 / (m2 * np.sqrt(m2)),
            centroid,
            *bands,
        ]
    )


def generate_pool(cfg: SimulatedSensor, size: int) -> list[FloatArray]:
    source = SimulatedSource(cfg)
    return [source.window_values(k) for k in range(size)]


def run_pipeline(
    pool: list[FloatArray],
    windows: int,
    cfg: SimulatedSensor,
    *,
    settings: FeatureSettings = VIBRATION,
    score: Score | None = None,
) -> float:
    """Seconds to window and summarise `windows` windows (and score them when `score` is given:
    the hook for the anomaly scoring)."""
    channels = tuple(channel.name for channel in cfg.channels)
    span = pool[0].shape[1] / cfg.sample_rate
    wall_start = utc_now()
    start = time.perf_counter()
    for k in range(windows):
        values = pool[k % len(pool)]
        # The simulated source counts missing samples for its health before it yields a window.
        np.count_nonzero(np.isnan(values))
        window = SampleWindow(
            source=cfg.name,
            channels=channels,
            values=values,
            ts=wall_start + timedelta(seconds=k * span),
            mono_ns=time.monotonic_ns(),
            duration_s=span,
            sample_rate=cfg.sample_rate,
        )
        summary = summarise(window, settings=settings)
        if score is not None:
            score(summary)
    return time.perf_counter() - start


def run_bare(pool: list[FloatArray], windows: int, spectrum: BareSpectrum) -> float:
    start = time.perf_counter()
    for k in range(windows):
        bare_features(pool[k % len(pool)], spectrum)
    return time.perf_counter() - start


def agreement(values: FloatArray, cfg: SimulatedSensor, spectrum: BareSpectrum) -> dict[str, Any]:
    """Largest relative difference between the bare features and summarise's (rounded to 7
    significant digits, so up to 5e-7); shows that the two compute the same things."""
    names = feature_names("vibration", cfg.sample_rate)
    bare = bare_features(values, spectrum)
    if bare.shape != (len(cfg.channels), len(names)):
        return {"same_features": False, "shape": list(bare.shape), "expected": len(names)}
    window = SampleWindow(
        source=cfg.name,
        channels=tuple(channel.name for channel in cfg.channels),
        values=values,
        ts=utc_now(),
        mono_ns=time.monotonic_ns(),
        duration_s=values.shape[1] / cfg.sample_rate,
        sample_rate=cfg.sample_rate,
    )
    summary = summarise(window, settings=VIBRATION)
    worst = 0.0
    worst_at = ""
    for row, channel in enumerate(window.channels):
        for column, name in enumerate(names):
            ours = summary[channel][name]
            if ours is None:
                return {"same_features": False, "missing": f"{channel}.{name}"}
            reference = float(bare[row, column])
            difference = abs(float(ours) - reference) / max(abs(reference), 1e-12)
            if difference > worst:
                worst, worst_at = difference, f"{channel}.{name}"
    return {
        "same_features": worst < 1e-6,
        "max_relative_difference": float(f"{worst:.3g}"),
        "at": worst_at,
        "features_per_channel": len(names),
    }


def throughput(
    windows: int, rounds: int, pool_size: int, *, score: Score | None = None
) -> dict[str, Any]:
    cfg = sensor_config("fast")
    progress(f"throughput: generating {pool_size} windows of {CHANNELS} x {SAMPLE_RATE:g} samples")
    pool = generate_pool(cfg, pool_size)
    samples_per_window = pool[0].size
    spectrum = BareSpectrum.for_window(pool[0].shape[1], cfg.sample_rate)
    check = agreement(pool[0], cfg, spectrum)
    progress(f"  bare vs summarise: {check}")
    # Warm-up of both: caches (the spectral weights, numpy's FFT plans), page faults.
    run_bare(pool, min(windows, pool_size), spectrum)
    run_pipeline(pool, min(windows, pool_size), cfg, score=score)

    def rate(seconds: float) -> float:
        return windows * samples_per_window / seconds

    baselines = [rate(run_bare(pool, windows, spectrum))]
    pipelines: list[float] = []
    ratios: list[float] = []
    for index in range(rounds):
        pipelines.append(rate(run_pipeline(pool, windows, cfg, score=score)))
        baselines.append(rate(run_bare(pool, windows, spectrum)))
        reference = (baselines[-2] + baselines[-1]) / 2
        ratios.append(pipelines[-1] / reference)
        progress(
            f"  round {index + 1}: pipeline {pipelines[-1] / 1e6:.1f} M samples/s, "
            f"baseline {reference / 1e6:.1f} M samples/s, ratio {ratios[-1]:.3f}"
        )
    ratio = statistics.median(ratios)
    return {
        "windows_per_run": windows,
        "rounds": rounds,
        "pool_windows": pool_size,
        "samples_per_window": samples_per_window,
        "scored": score is not None,
        "pipeline_samples_per_s": round(statistics.median(pipelines)),
        "baseline_samples_per_s": round(statistics.median(baselines)),
        "pipeline_ms_per_window": round(samples_per_window / statistics.median(pipelines) * 1e3, 3),
        "baseline_ms_per_window": round(samples_per_window / statistics.median(baselines) * 1e3, 3),
        "ratio": round(ratio, 3),
        "ratios": [round(r, 3) for r in ratios],
        "pipeline_runs_samples_per_s": [round(r) for r in pipelines],
        "baseline_runs_samples_per_s": [round(r) for r in baselines],
        "check": check,
    }


# ------------------------------------------------------------------------------- CPU share


async def cpu_share(seconds: float, *, score: Score | None = None) -> dict[str, Any]:
    """The realtime source through summarise for `seconds` of windows after the first one."""
    cfg = sensor_config("realtime")
    source = SimulatedSource(cfg)
    to_measure = max(1, round(seconds / cfg.window))
    measured = 0
    summarise_cpu = 0.0
    wall0 = cpu0 = 0.0
    lag_s: list[float] = []
    async with source:
        readings = source.readings()
        assert isinstance(readings, AsyncGenerator)
        # Closed here, not whenever the loop shuts down, so the source ends inside the measure.
        async with contextlib.aclosing(readings):
            async for reading in readings:
                if not isinstance(reading, SampleWindow):
                    continue
                # How late the window reached us after its end (its schedule is absolute).
                lag_s.append(time.time() - (reading.ts.timestamp() + reading.duration_s))
                before = time.process_time()
                summary = summarise(reading, settings=cfg.features)
                if score is not None:
                    score(summary)
                after = time.process_time()
                if wall0 == 0.0:
                    wall0, cpu0 = time.perf_counter(), after  # the first window is the warm-up
                    continue
                summarise_cpu += after - before
                measured += 1
                if measured >= to_measure:
                    break
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    return {
        "seconds": round(wall, 2),
        "windows": measured,
        "samples_per_s": round(measured * CHANNELS * cfg.sample_rate * cfg.window / wall),
        "features_kind": cfg.features.kind,
        "scored": score is not None,
        "cpu_seconds": round(cpu, 3),
        "cpu_cores": round(cpu / wall, 4),
        "summarise_cpu_cores": round(summarise_cpu / wall, 4),
        "summarise_ms_per_window": round(summarise_cpu / max(measured, 1) * 1e3, 3),
        "source_and_loop_cpu_cores": round((cpu - summarise_cpu) / wall, 4),
        "window_lag_ms": {
            "median": round(statistics.median(lag_s) * 1e3, 2),
            "max": round(max(lag_s) * 1e3, 2),
        },
    }


# ------------------------------------------------------------------------------------ main


def fingerprint() -> dict[str, str]:
    """sha256 (12 hex) of the code the numbers belong to."""
    out: dict[str, str] = {}
    for name in (
        "inference/features.py",
        "sensors/simulated.py",
        "sensors/base.py",
        "bench/sensor_throughput.py",
    ):
        try:
            out[name] = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:12]
        except OSError:
            out[name] = "missing"
    return out


def hotelling_scoring(cfg: SimulatedSensor) -> tuple[Score, dict[str, Any]]:
    """The appliance's anomaly scoring for this source: a Hotelling baseline on every feature
    of every channel, fitted (not timed) on FIT_WINDOWS windows of the same signal."""
    progress(f"scoring: fitting a hotelling baseline on {FIT_WINDOWS} windows")
    fit_cfg = cfg.model_copy(update={"seed": 99})
    source = SimulatedSource(fit_cfg)
    channels = tuple(channel.name for channel in cfg.channels)
    names = [f"{c}.{f}" for c in channels for f in feature_names("vibration", cfg.sample_rate)]
    vectors = []
    for k in range(FIT_WINDOWS):
        window = SampleWindow(
            source=cfg.name,
            channels=channels,
            values=source.window_values(k),
            ts=utc_now(),
            mono_ns=time.monotonic_ns(),
            duration_s=cfg.window,
            sample_rate=cfg.sample_rate,
        )
        vectors.append(feature_vector(summarise(window, settings=VIBRATION), names))
    settings = AnomalySettings(method="hotelling", min_windows=30)
    baseline = fit_baseline(settings, np.asarray(vectors), names)
    detector = AnomalyDetector(settings, baseline)

    def score(summary: Summary) -> object:
        return detector.observe(feature_vector(summary, names), utc_now())

    return score, {"method": "hotelling", "features": len(names), "fit_windows": FIT_WINDOWS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="short phases, for CI and smoke runs")
    parser.add_argument(
        "--windows", type=int, help="throughput: windows per timed run (default 200; quick 15)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="throughput: pipeline runs, each between two baseline runs (default 5; quick 2)",
    )
    parser.add_argument(
        "--pool", type=int, default=8, help="throughput: distinct pre-generated windows cycled"
    )
    parser.add_argument(
        "--seconds", type=float, help="cpu: seconds measured at realtime pace (default 20; quick 3)"
    )
    parser.add_argument(
        "--no-score", action="store_true", help="leave the anomaly scoring out of both phases"
    )
    args = parser.parse_args()
    windows: int = args.windows or (15 if args.quick else 200)
    rounds: int = args.rounds or (2 if args.quick else 5)
    seconds: float = args.seconds or (3.0 if args.quick else 20.0)
    if windows < 1 or rounds < 1 or args.pool < 1 or seconds <= 0:
        parser.error("--windows, --rounds and --pool must be >= 1 and --seconds > 0")

    box = machine(Path(tempfile.gettempdir()))
    box.pop("data_dir_filesystem", None)  # nothing is written to disk here
    box["numpy"] = np.__version__
    box["thread_env"] = {
        name: os.environ.get(name)
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    }
    score: Score | None = None
    scoring: dict[str, Any] | None = None
    if not args.no_score:
        score, scoring = hotelling_scoring(sensor_config("fast"))
    result_throughput = throughput(windows, rounds, args.pool, score=score)
    progress(f"cpu: realtime simulated source through summarise for {seconds:g} s")
    result_cpu = asyncio.run(cpu_share(seconds, score=score))
    progress(f"  {result_cpu['cpu_cores']} cores")
    passed = {
        "same_features": bool(result_throughput["check"]["same_features"]),
        "throughput_ratio": result_throughput["ratio"] >= TARGET_RATIO,
        "cpu_cores": result_cpu["cpu_cores"] < TARGET_CPU_CORES,
    }
    emit(
        {
            "benchmark": "sensor_throughput",
            "quick": args.quick,
            "machine": box,
            "source": fingerprint(),
            "settings": {
                "channels": CHANNELS,
                "sample_rate_hz": SAMPLE_RATE,
                "window_s": WINDOW_S,
                "features": list(feature_names("vibration", SAMPLE_RATE)),
            },
            "scoring": scoring,
            "throughput": result_throughput,
            "cpu": result_cpu,
            "peak_rss_mib": peak_rss_mib(),
            "targets": {
                "throughput_ratio_min": TARGET_RATIO,
                "cpu_cores_max": TARGET_CPU_CORES,
            },
            "pass": {**passed, "all": all(passed.values())},
        }
    )


if __name__ == "__main__":
    main()
