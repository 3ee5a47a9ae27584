"""A sensor source's anomaly stage: fit a baseline from the first healthy running or load the saved
one, score every window's feature vector, journal anomalies with the raw samples around them,
stamped with the baseline's name@version; hand every scored window to an observer (a refit's
canary or watch, appliance/models/refit.py) and swap baselines between two windows."""

from __future__ import annotations

import asyncio
import io
import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from appliance.runtime.logs import RateLimitedLog
from appliance.stages.baselines import BaselineStore
from appliance.stages.recorder import Recorder
from config import AnomalySettings
from inference.anomaly import AnomalyDetector, AnomalyEvent
from inference.anomaly_fit import BaselineCollector
from inference.baseline import Baseline
from inference.features import Summary, feature_vector
from inference.session import InferenceError
from sensors.base import SampleWindow
from sync import NewRecord, Priority
from sync.records import format_ts

log = logging.getLogger(__name__)


def feature_names_of(summary: Summary, wanted: list[str]) -> list[str]:
    """The vector's layout: the configured `channel.feature` names, or every numeric feature of
    every channel in the first window (sorted, so a restart lays it out the same way)."""
    if wanted:
        return list(wanted)
    return sorted(
        f"{channel}.{feature}"
        for channel, features in summary.items()
        for feature in features
        if feature != "n"
    )


CHANNEL_FLAGS = frozenset({"missing", "nan", "inf", "out_of_range"})
"""Bad input that touches single channels and leaves them without those samples (NaN): only
the features of the channels that lost samples are doubtful. Any other flag (a gap, a clock
that went back, a malformed message, a stuck sensor) casts doubt on the whole window."""


def usable_for_anomalies(
    window: SampleWindow, vector: np.ndarray[Any, Any], names: list[str]
) -> bool:
    """Whether the window may be fitted or scored at all; the features of channels that lost
    samples to bad input are set to NaN in `vector` (in place). The baseline judges what is not
    a number: it leaves out features missing in most of its windows (a dead sensor: the others
    go on) and drops or skips the windows where a used feature is missing."""
    if not window.quality:
        return True
    if not CHANNEL_FLAGS.issuperset(window.quality):
        return False
    lost = {
        channel
        for channel, row in zip(window.channels, window.values, strict=True)
        if not np.isfinite(row).all()
    }
    for index, name in enumerate(names):
        if name.rpartition(".")[0] in lost:
            vector[index] = np.nan
    return True


def encode_windows(windows: list[SampleWindow], anomaly_index: int) -> bytes:
    """Raw samples of consecutive windows as one compressed .npz: `values` (channels x samples,
    float32, the windows end to end), `times_s` (each sample's seconds after the first window's
    start), `window_starts` (ISO times), and `anomaly_window` (which window the anomaly began in)."""
    first = windows[0].ts
    channels = windows[-1].channels  # channels are only ever appended: the last has them all
    values = np.concatenate(
        [
            np.pad(w.values, ((0, len(channels) - len(w.channels)), (0, 0)), constant_values=np.nan)
            for w in windows
        ],
        axis=1,
    ).astype(np.float32)
    times: list[np.ndarray[Any, np.dtype[np.float64]]] = []
    for window in windows:
        offset = (window.ts - first).total_seconds()
        samples = window.values.shape[1]
        if window.times_s is not None:
            own = window.times_s
        elif window.sample_rate:
            own = np.arange(samples) / window.sample_rate
        else:
            own = np.linspace(0.0, window.duration_s, samples, endpoint=False)
        times.append(own + offset)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        values=values,
        times_s=np.concatenate(times),
        channels=np.array(channels),
        window_starts=np.array([format_ts(w.ts) for w in windows]),
        anomaly_window=np.array(anomaly_index),
        sample_rate=np.array(windows[0].sample_rate or np.nan),
    )
    return buffer.getvalue()


@dataclass
class _OpenAnomaly:
    """An anomaly whose raw windows are still being gathered (its post-roll)."""

    seq: int | None
    priority: Priority
    windows: list[SampleWindow]
    anomaly_index: int
    post_left: int
    model: str | None
    """The baseline that found it: its raw windows carry that name even after a swap."""


class ScoreObserver(Protocol):
    """Sees every clean window the stage scores, right after its baseline scored it (a refit's
    canary scores the same vector with its candidate; its watch counts alarms). Called on the
    event loop, synchronously: it must be quick and must not raise."""

    def observe(
        self, vector: np.ndarray[Any, Any], ts: datetime, score: float | None, threshold: float
    ) -> None:
        """`score` is None when the stage's baseline failed on the window."""
        ...


@dataclass
class _Swap:
    baseline: Baseline
    observer: ScoreObserver | None
    cause: str
    done: asyncio.Event


@dataclass
class AnomalyStats:
    scored: int = 0
    skipped: int = 0  # windows with bad input or missing features: neither fitted nor scored
    errors: int = 0  # windows the model failed on
    anomalies: int = 0
    baseline_windows: int = 0
    swaps: int = 0  # baselines replaced while running (refit activations and rollbacks)
    last_score: float | None = None
    threshold: float | None = None


class AnomalyStage:
    """One source's baseline, scoring and anomaly records."""

    def __init__(
        self,
        source: str,
        settings: AnomalySettings,
        recorder: Recorder,
        store: BaselineStore,
        *,
        wait_for_fit: bool = False,
    ) -> None:
        """`wait_for_fit`: hold the windows while the baseline is fitted (replay: data comes as
        fast as it is taken, and every window after the baseline period must be scored)."""
        self.source = source
        self.wait_for_fit = wait_for_fit
        self.settings = settings
        self.recorder = recorder
        self.store = store
        self.stats = AnomalyStats()
        self.baseline: Baseline | None = None
        self.detector: AnomalyDetector | None = None
        self._names: list[str] | None = None
        self._collector: BaselineCollector | None = None
        self._fitting: asyncio.Task[Baseline] | None = None
        self._recent: deque[SampleWindow] = deque(maxlen=max(settings.raw_windows[0], 0) or 1)
        self._open: list[_OpenAnomaly] = []
        self._observer: ScoreObserver | None = None
        self._swap: _Swap | None = None
        self._warn = RateLimitedLog(log)

    @property
    def model(self) -> str | None:
        """`<source>-baseline@<version>` once a baseline scores this source."""
        if self.baseline is None:
            return None
        return f"{self.source}-baseline@{self.baseline.version}"

    def describe(self) -> dict[str, Any]:
        """The stage's state for health records and the status page, JSON-ready."""
        return {
            "model": self.model,
            "state": "scoring"
            if self.detector is not None
            else ("fitting" if self._fitting is not None else "collecting"),
            "method": self.settings.method,
            "threshold": self.stats.threshold,
            "last_score": self.stats.last_score,
            "in_anomaly": bool(self.detector is not None and self.detector.active),
            "anomalies": self.stats.anomalies,
            "scored": self.stats.scored,
            "skipped": self.stats.skipped,
            "errors": self.stats.errors,
            "baseline_windows": self.stats.baseline_windows,
            "swaps": self.stats.swaps,
        }

    def load(self) -> None:
        """Score with the saved baseline, if there is one that fits the configuration."""
        saved = self.store.load_current(self.source)
        if saved is None:
            return
        if saved.method != self.settings.method or (
            self.settings.features and list(saved.names) != list(self.settings.features)
        ):
            log.warning(
                "baseline %s of %s was fitted for %s on %d features; the configuration asks "
                "for %s: fitting anew",
                saved.version,
                self.source,
                saved.method,
                len(saved.names),
                self.settings.method,
            )
            return
        self._use(saved)

    def _use(self, baseline: Baseline) -> None:
        self.baseline = baseline
        self._names = list(baseline.names)
        self.detector = AnomalyDetector(self.settings, baseline)
        self.stats.threshold = baseline.threshold

    def observe_with(self, observer: ScoreObserver | None) -> None:
        """Hand every window scored from now on to `observer` as well (None: to nobody)."""
        self._observer = observer

    @property
    def observer(self) -> ScoreObserver | None:
        return self._observer

    def replace_baseline(
        self, baseline: Baseline, *, observer: ScoreObserver | None, cause: str
    ) -> asyncio.Event:
        """Score with `baseline` from the next window on (`begin_window`), with `observer`
        watching it; the event is set once the swap happened. Atomic: every window is scored,
        and its records stamped, by one baseline only."""
        if self._names is not None and list(baseline.names) != self._names:
            raise ValueError(
                f"baseline {baseline.version} has features {list(baseline.names)}, the stage "
                f"scores {self._names}"
            )
        AnomalyDetector(self.settings, baseline)  # the same checks as the swap: fail here, now
        if self._swap is not None:
            self._swap.done.set()  # superseded: the waiter sees the stage's baseline instead
        self._swap = _Swap(baseline, observer, cause, asyncio.Event())
        return self._swap.done

    async def begin_window(self, window: SampleWindow) -> None:
        """Called by the pipeline before anything of `window` is journalled: a requested
        baseline swap happens here, between the previous window and this one. An anomaly the
        outgoing baseline had open is closed with an `ended` record naming the cause (the new
        baseline's detector starts with no anomaly)."""
        swap, self._swap = self._swap, None
        if swap is None:
            return
        outgoing, outgoing_model = self.detector, self.model
        if outgoing is not None and outgoing.active:
            await self.recorder.append(
                NewRecord(
                    source=self.source,
                    kind="anomaly",
                    priority=Priority.EVENT,
                    body={
                        "kind": "ended",
                        "cause": swap.cause,
                        "replaced_by": swap.baseline.version,
                        "at": format_ts(window.ts),
                        "baseline": outgoing.baseline.version,
                        "method": outgoing.baseline.method,
                    },
                    model=outgoing_model,
                    ts=window.ts,
                    mono_ns=window.mono_ns,
                )
            )
        self._use(swap.baseline)
        self._observer = swap.observer
        self.stats.swaps += 1
        if swap.baseline.excluded != (outgoing.baseline.excluded if outgoing else {}):
            await self._journal_exclusions(swap.baseline, at=window)
        log.info(
            "baseline of %s swapped (%s): %s -> %s",
            self.source,
            swap.cause,
            outgoing_model,
            self.model,
        )
        swap.done.set()

    async def on_window(self, window: SampleWindow, summary: Summary) -> float | None:
        """Fit or score the window; its anomaly score when a baseline scored it, else None."""
        if self._names is None:
            self._names = feature_names_of(summary, self.settings.features)
        vector = feature_vector(summary, self._names)
        clean = usable_for_anomalies(window, vector, self._names)
        await self._gather_raw(window)
        if self._fitting is not None and self._fitting.done():
            await self._fitted(self._fitting)
        score = None
        if self.detector is None:
            await self._collect(window, vector, clean)
        elif not clean:
            self.stats.skipped += 1
        else:
            score = await self._score(window, vector)
        self._recent.append(window)
        return score

    async def _score(self, window: SampleWindow, vector: np.ndarray[Any, Any]) -> float | None:
        assert self.detector is not None
        skipped_before = self.detector.skipped
        try:
            events = self.detector.observe(vector, window.ts)
        except InferenceError as exc:  # onnxruntime failed on this window: count, go on
            self.stats.errors += 1
            self._warn.warning(
                "score", "anomaly scoring failed", source=self.source, error=str(exc)
            )
            if self._observer is not None:
                self._observer.observe(vector, window.ts, None, self.detector.threshold)
            return None
        if self.detector.skipped > skipped_before:
            self.stats.skipped += 1
            return None
        self.stats.scored += 1
        if self._observer is not None:
            self._observer.observe(
                vector, window.ts, self.detector.last_score, self.detector.threshold
            )
        for event in events:
            await self._journal_event(event, window)
        self.stats.last_score = self.detector.last_score
        return self.detector.last_score

    async def _collect(
        self, window: SampleWindow, vector: np.ndarray[Any, Any], clean: bool
    ) -> None:
        if self._fitting is not None:
            # Live, the fit runs beside the windows still coming: those are neither fitted nor
            # scored (counted). A replay waits for the fit instead (`wait_for_fit`).
            self.stats.skipped += 1
            return
        if self._collector is None:
            self._collector = BaselineCollector(self.settings, self._names or [])
        if not clean:
            self.stats.skipped += 1
            return
        self._collector.add(vector, window.ts)
        self.stats.baseline_windows += 1
        if self._collector.ready():
            # Fitting (an isolation forest, an autoencoder) takes seconds: off the event loop.
            self._fitting = asyncio.create_task(asyncio.to_thread(self._collector.fit))
            if self.wait_for_fit:
                await asyncio.wait({self._fitting})
                await self._fitted(self._fitting)

    async def _fitted(self, task: asyncio.Task[Baseline]) -> None:
        self._fitting = None
        try:
            baseline = task.result()
        except ValueError as exc:
            log.warning("baseline of %s not fitted: %s; collecting again", self.source, exc)
            self._collector = None
            return
        await asyncio.to_thread(self.store.save, self.source, baseline)
        self._use(baseline)
        self._collector = None
        await self.recorder.append(
            NewRecord(
                source=self.source,
                kind="baseline",
                priority=Priority.EVENT,
                body={
                    "state": "fitted",
                    "version": baseline.version,
                    "method": baseline.method,
                    "windows": baseline.windows,
                    "threshold": baseline.threshold,
                    "features": list(baseline.names),
                    "excluded": baseline.excluded,
                },
                model=self.model,
            )
        )
        await self._journal_exclusions(baseline, at=None)

    async def _journal_exclusions(self, baseline: Baseline, at: SampleWindow | None) -> None:
        """A data-quality record naming the features `baseline` leaves out (missing or frozen
        during its baseline), so that an operator sees a dead sensor rather than a quiet one."""
        excluded = baseline.excluded
        if not excluded:
            return
        counts: dict[str, int] = {}
        for reason in excluded.values():
            counts[f"baseline_{reason}"] = counts.get(f"baseline_{reason}", 0) + 1
        meaning = {
            "missing": "not a number in most of the baseline's windows",
            "frozen": "the same value in every window of the baseline",
        }
        await self.recorder.append(
            NewRecord(
                source=self.source,
                kind="data_quality",
                priority=Priority.EVENT,
                body={
                    "counts": counts,
                    "examples": [
                        {
                            "reason": f"baseline_{reason}",
                            "detail": f"{name}: {meaning.get(reason, reason)}; left out of "
                            f"anomaly baseline {baseline.version}",
                            "line": None,
                        }
                        for name, reason in sorted(excluded.items())
                    ],
                    "baseline": baseline.version,
                    "excluded": excluded,
                },
                model=self.model,
                ts=None if at is None else at.ts,
                mono_ns=None if at is None else at.mono_ns,
            )
        )
        log.warning(
            "anomaly baseline %s of %s leaves out %d feature(s) missing or frozen during its "
            "baseline: %s",
            baseline.version,
            self.source,
            len(excluded),
            ", ".join(f"{name} ({why})" for name, why in sorted(excluded.items())),
        )

    async def _journal_event(self, event: AnomalyEvent, window: SampleWindow) -> None:
        priority = Priority.from_label(event.priority)
        if event.kind == "started":
            self.stats.anomalies += 1
        seq = await self.recorder.append(
            NewRecord(
                source=self.source,
                kind="anomaly",
                priority=priority,
                body=event.as_dict(),
                model=self.model,
                ts=window.ts,
                mono_ns=window.mono_ns,
            )
        )
        if event.kind == "started":
            pre = (
                list(self._recent)[-self.settings.raw_windows[0] :]
                if self.settings.raw_windows[0]
                else []
            )
            self._open.append(
                _OpenAnomaly(
                    seq=seq,
                    priority=priority,
                    windows=[*pre, window],
                    anomaly_index=len(pre),
                    post_left=self.settings.raw_windows[1],
                    model=self.model,
                )
            )
            if not self.settings.raw_windows[1]:
                await self._keep_raw(self._open.pop())
        elif event.kind == "escalated":
            for anomaly in self._open:
                anomaly.priority = min(anomaly.priority, priority)

    async def _gather_raw(self, window: SampleWindow) -> None:
        for anomaly in list(self._open):
            anomaly.windows.append(window)
            anomaly.post_left -= 1
            if anomaly.post_left <= 0:
                self._open.remove(anomaly)
                await self._keep_raw(anomaly)

    async def _keep_raw(self, anomaly: _OpenAnomaly) -> None:
        windows = anomaly.windows
        data = await asyncio.to_thread(encode_windows, windows, anomaly.anomaly_index)
        ref = await self.recorder.store(data, "application/x-npz", anomaly.priority)
        if ref is None:
            return
        await self.recorder.append_with_payloads(
            NewRecord(
                source=self.source,
                kind="anomaly_window",
                priority=anomaly.priority,
                body={
                    "anomaly_seq": anomaly.seq,
                    "windows": len(windows),
                    "anomaly_window": anomaly.anomaly_index,
                    "channels": list(windows[-1].channels),
                    "samples": int(sum(w.values.shape[1] for w in windows)),
                    "start": format_ts(windows[0].ts),
                },
                model=anomaly.model,
                payloads=(ref,),
                ts=windows[0].ts,
            )
        )

    async def finish(self) -> None:
        """The source ended: keep the raw windows of open anomalies, finish a fit in progress."""
        for anomaly in self._open:
            await self._keep_raw(anomaly)
        self._open.clear()
        if self._fitting is not None:
            await asyncio.wait({self._fitting})
            await self._fitted(self._fitting)
