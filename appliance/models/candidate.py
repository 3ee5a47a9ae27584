"""Owns making a refit's candidate baseline: a source's recorded healthy windows in the journal
(less bad input and anything near an anomaly), and fitting and validating a candidate on them in
a niced, single-threaded child process so inference keeps its cores (refit.py says when and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from appliance.stages.anomalies import feature_names_of
from appliance.stages.baselines import BaselineStore
from config.analysis import AnomalySettings
from config.units import format_duration
from inference.anomaly_fit import fit_baseline
from inference.baseline import BaselineError
from inference.features import feature_vector
from sync.errors import JournalMissing
from sync.reader import JournalReader
from sync.records import format_ts, parse_ts

FloatArray = npt.NDArray[np.float64]
T = TypeVar("T")

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
MAX_NICENESS = 19


# -- recorded readings -------------------------------------------------------------------------


@dataclass
class RecordedWindows:
    """Feature vectors of a source's recorded readings, in journal order."""

    names: list[str]
    vectors: list[FloatArray] = field(default_factory=list)
    times: list[datetime] = field(default_factory=list)
    skipped: int = 0
    """Readings with bad input (a `quality` list) or without features: never fitted."""
    near_anomaly: int = 0
    """Readings in or near one of the source's anomalies (only when those are left out)."""

    @property
    def span(self) -> tuple[datetime, datetime] | None:
        return (self.times[0], self.times[-1]) if self.times else None


def recorded_windows(
    reader: JournalReader,
    source: str,
    settings: AnomalySettings,
    *,
    since: str | None = None,
    until: str | None = None,
    names: list[str] | None = None,
    leave_out_anomalies: bool = False,
) -> RecordedWindows:
    """Feature vectors of `source`'s readings in [since, until) (ISO times as the journal writes
    them), laid out as `names` (default: as the stage lays out the first reading). Readings that
    met bad input are skipped and counted, as the daemon's own fit does; with
    `leave_out_anomalies`, so are those in or near (`settings.raw_windows`) an anomaly."""
    found = RecordedWindows(names=list(names) if names is not None else [])
    anomalies = _anomaly_spans(reader, source) if leave_out_anomalies else []
    pre, post = settings.raw_windows
    for record in reader.iter_records(kind="reading", since=since):
        if record.source != source:
            continue
        if until is not None and record.ts >= until:
            break
        body = record.body
        summary = body.get("channels") if isinstance(body, dict) else None
        if not isinstance(summary, dict) or body.get("quality"):
            found.skipped += 1
            continue
        ts = parse_ts(record.ts)
        if anomalies:
            window_s = float(body.get("window_s") or 0.0)
            if _near(anomalies, ts, pre_s=pre * window_s, post_s=post * window_s):
                found.near_anomaly += 1
                continue
        if not found.names:
            found.names = feature_names_of(summary, settings.features)
        found.vectors.append(feature_vector(summary, found.names))
        found.times.append(ts)
    return found


def _anomaly_spans(reader: JournalReader, source: str) -> list[tuple[datetime, datetime]]:
    """(first window, last window) of each anomaly of `source`; one still open runs to the end
    of time. Paired by the baseline that raised them (one open anomaly per baseline at a time)."""
    spans: list[tuple[datetime, datetime]] = []
    open_since: dict[str, datetime] = {}
    for record in reader.iter_records(kind="anomaly"):
        body = record.body
        if record.source != source or not isinstance(body, dict):
            continue
        baseline = str(body.get("baseline"))
        at = parse_ts(str(body.get("at") or record.ts))
        started = body.get("started_at")
        if body.get("kind") == "started":
            open_since[baseline] = parse_ts(str(started)) if started else at
        elif body.get("kind") == "ended":
            begun = open_since.pop(baseline, None)
            if begun is None:
                begun = parse_ts(str(started)) if started else at
            spans.append((begun, at))
    far = datetime.max.replace(tzinfo=UTC)
    spans += [(begun, far) for begun in open_since.values()]
    return spans


def _near(
    spans: list[tuple[datetime, datetime]], ts: datetime, *, pre_s: float, post_s: float
) -> bool:
    """Whether a window starting at `ts` lies in an anomaly, in the `pre_s` before its first
    window (its pre-roll) or in the `post_s` after its last one (its post-roll)."""
    for begun, ended in spans:
        high = ended if ended.year == datetime.max.year else ended + timedelta(seconds=post_s)
        if begun - timedelta(seconds=pre_s) <= ts <= high:
            return True
    return False


# -- the child process: fit and validate ------------------------------------------------------


@dataclass(frozen=True)
class RefitJob:
    """Everything the child needs (pickled to it): it opens the journal read-only itself."""

    data_dir: Path
    baselines: Path
    source: str
    settings: AnomalySettings
    names: tuple[str, ...]
    current: str | None


@dataclass(frozen=True)
class Prepared:
    """What the child made of it: `skipped` (too little clean data), `rejected` (validation
    failed) or `validated` (saved as `version`, not current)."""

    outcome: Literal["skipped", "rejected", "validated"]
    reason: str | None
    figures: dict[str, Any]
    version: str | None = None


def lower_priority(niceness: int) -> None:
    """The pool's initializer, in the child: one BLAS/OpenMP thread, and at least `niceness`
    (on Linux the child already has it from its first instruction: see `_spawn_worker`).

    numpy (and its BLAS) is already loaded when this runs (the child imports this module to find
    the function), so threadpoolctl limits the pools that exist; the variables cover the OpenMP
    runtime scikit-learn loads later."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    for variable in BLAS_THREAD_VARIABLES:
        os.environ[variable] = "1"
    threadpool_limits(limits=1)
    os.nice(max(0, niceness - os.nice(0)))


def _spawn_worker(pool: ProcessPoolExecutor, niceness: int) -> Future[int]:
    """Start the pool's worker from this thread, niced first: a child inherits the niceness of
    the thread that forks it (Linux keeps it per thread), so the worker's imports (a second or
    two of CPU: numpy, onnxruntime, the appliance) run niced too, not only what follows its
    initializer. Called in a throwaway thread: none of the daemon's threads is ever niced."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    return pool.submit(os.getpid)  # the first submit spawns the worker, in this thread


def prepare_candidate(job: RefitJob) -> Prepared:
    """In the child: read the recent clean windows, fit on the older part, score the held-out
    newest part, save the candidate (not current) when it validates."""
    settings, refit = job.settings, job.settings.refit
    started_cpu, started_wall = time.process_time(), time.monotonic()
    figures: dict[str, Any] = {"method": settings.method, "data_s": refit.data}
    try:
        reader = JournalReader.open(job.data_dir)
    except JournalMissing as exc:
        return Prepared("skipped", str(exc), figures)
    with reader:
        newest = reader.newest_ts(job.source, "reading")
        if newest is None:
            return Prepared("skipped", f"no readings of {job.source} in the journal", figures)
        since = parse_ts(newest) - timedelta(seconds=refit.data)
        found = recorded_windows(
            reader,
            job.source,
            settings,
            since=format_ts(since),
            names=list(job.names),
            leave_out_anomalies=True,
        )
    rows = np.array(found.vectors, dtype=np.float64).reshape(-1, len(job.names))
    # A window with some features not a number is kept: the fit leaves out features missing
    # too often (and then drops the windows still incomplete), as the daemon's own fit does.
    finite = np.asarray(np.isfinite(rows).any(axis=1), dtype=bool)
    times = [ts for ts, ok in zip(found.times, finite.tolist(), strict=True) if ok]
    rows = rows[finite]
    held_out = math.ceil(rows.shape[0] * refit.holdout)
    fitted_on = rows.shape[0] - held_out
    figures |= {
        "windows": int(rows.shape[0]),
        "windows_fit": max(fitted_on, 0),
        "windows_held_out": held_out,
        "skipped_bad_input": found.skipped + int((~finite).sum()),
        "skipped_near_anomaly": found.near_anomaly,
    }
    if times:
        figures |= {"data_from": format_ts(times[0]), "data_to": format_ts(times[-1])}
    if fitted_on < settings.min_windows or held_out < 1:
        return Prepared(
            "skipped",
            f"{rows.shape[0]} clean windows in the last {format_duration(refit.data)} of "
            f"readings: {max(fitted_on, 0)} to fit on after holding out {held_out}, fewer than "
            f"min_windows={settings.min_windows}",
            figures,
        )
    try:
        candidate = fit_baseline(
            settings,
            rows[:fitted_on],
            job.names,
            dropped=figures["skipped_bad_input"],
            covering=(times[0], times[fitted_on - 1]),
        )
    except ValueError as exc:
        return Prepared("skipped", f"not fitted: {exc}", figures)
    scores = candidate.scores(rows[fitted_on:])
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        return Prepared(
            "skipped",
            f"none of the {held_out} held-out windows could be scored by the candidate "
            "(their features are not numbers)",
            figures,
        )
    share = float(np.mean(scores > candidate.threshold))
    figures |= {
        "version": candidate.version,
        "threshold": candidate.threshold,
        "held_out_over_share": round(share, 4),
        "max_over_share": refit.max_over_share,
    }
    store = BaselineStore(job.baselines)
    if job.current is not None:
        with contextlib.suppress(OSError, BaselineError):
            current = store.load(job.source, job.current)
            if current.names == candidate.names:
                current_scores = current.scores(rows[fitted_on:])
                current_scores = current_scores[np.isfinite(current_scores)]
                if current_scores.size:
                    over = current_scores > current.threshold
                    figures["current_held_out_over_share"] = round(float(np.mean(over)), 4)
    figures |= {
        "fit_cpu_s": round(time.process_time() - started_cpu, 3),
        "fit_wall_s": round(time.monotonic() - started_wall, 3),
        "nice": os.nice(0),
    }
    if share > refit.max_over_share:
        return Prepared(
            "rejected",
            f"{share:.1%} of the {held_out} held-out windows score over the new threshold "
            f"{candidate.threshold:.4g} (max_over_share {refit.max_over_share:.1%})",
            figures,
        )
    store.save(job.source, candidate, make_current=False)
    return Prepared("validated", None, figures, version=candidate.version)


async def run_in_child(function: Callable[[Any], T], argument: Any, *, nice: int) -> T:
    """`function(argument)` in a fresh niced one-worker process pool, shut down after.

    Cancelling (the daemon stops) kills the child at once rather than waiting for its fit: its
    pid is asked for first, since `ProcessPoolExecutor` has no public way to end a worker."""
    loop = asyncio.get_running_loop()
    niceness = min(os.nice(0) + nice, MAX_NICENESS)
    pool = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=lower_priority,
        initargs=(niceness,),
    )
    spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refit-spawn")
    pid: int | None = None
    try:
        first = await loop.run_in_executor(spawner, _spawn_worker, pool, niceness)
        spawner.shutdown(wait=False)  # its one thread, niced, ends here
        pid = await asyncio.wrap_future(first)
        return await loop.run_in_executor(pool, function, argument)
    except asyncio.CancelledError:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise
    finally:
        spawner.shutdown(wait=False)
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


__all__ = [
    "Prepared",
    "RecordedWindows",
    "RefitJob",
    "lower_priority",
    "prepare_candidate",
    "recorded_windows",
    "run_in_child",
]
