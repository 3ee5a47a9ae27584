"""Owns refitting a source's anomaly baseline on the device: choosing its recent healthy readings
in the journal, fitting and validating a candidate in a niced child process, trying it in shadow
beside the current baseline (the canary), activating it between two windows, and watching it
after, with a rollback of its own. Every step is a `model` record that ships like any other.

When. The daemon's `refit` job (`Jobs`, on the monotonic clock: `appliance/runtime/scheduler.py` says why
not APScheduler) wakes every `CHECK_INTERVAL_S`; a source's refit starts when `refit.enabled`,
its current baseline is at least `refit.every` old, the UTC time is in one of `refit.windows`
(`config.units.in_windows`), and no attempt of it ran in the last day (or `every`, if shorter).

Data. The source's own `reading` records of the last `refit.data` of data time (ending at its
newest reading), less windows with bad input (a `quality` list, a non-finite feature) and windows
in or near (`anomaly.raw_windows`) any of its anomalies. The newest `holdout` share of them is
held out: the candidate is fitted on the older part and must keep the held-out windows under its
threshold (at most `max_over_share` over), else `refit_rejected`.

CPU. Fitting is the one heavy thing the appliance does besides inference (an isolation forest's
ONNX export alone is seconds of pure Python). It runs in a child process (a one-worker
`ProcessPoolExecutor`, started by "spawn" so it inherits no threads or locks of the daemon) whose
initializer adds `refit.nice` to its niceness and holds numpy's BLAS and OpenMP to one thread. So
it never holds the daemon's GIL, never takes more than one core, and when cores are short the
kernel gives them to the event loop, the sensor pipelines and the camera threads first: inference
keeps its latency and its frame rate. The pool lives for one fit only: no idle process between
refits, which are days apart.

Canary and watch. The `AnomalyStage` hands every window it scores to an observer: during the
canary the candidate scores the same vector with its own detector (its own debounce; it journals
nothing). After `refit.canary` of data time (and at least `JUDGED_WINDOWS` windows) it passes when
it raised no error and its share of windows over its threshold is at most `max_alarm_ratio` times
the current baseline's share plus `ALARM_SHARE_FLOOR`. A pass makes it current in the
`BaselineStore` (the old one kept as `previous`), then the stage swaps to it between two windows.
For `refit.watch` after that, a scoring error or an alarm share over the same limit (against the
share the old baseline had in the canary) swaps back to the previous baseline (`rolled_back`,
priority alert). A failed canary leaves the candidate on disk, not current.

The steps are the model-trial lifecycle of `trial.py` (shared with the detector canary); choosing
the data and fitting in the child process are `candidate.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, cast

import numpy.typing as npt

from appliance.models.candidate import RefitJob, prepare_candidate, run_in_child
from appliance.models.trial import ModelRecords, ModelTrial, Step, TrialOver
from appliance.stages.anomalies import AnomalyStage
from appliance.stages.baselines import BaselineStore
from appliance.stages.pipeline import SourcePipeline
from config import ApplianceConfig
from config.analysis import AnomalySettings
from config.units import format_duration, in_windows
from inference.anomaly import AnomalyDetector
from inference.baseline import Baseline, BaselineError
from sync import Journal, Priority
from sync.records import format_ts

log = logging.getLogger(__name__)


CHECK_INTERVAL_S = 300.0
"""How often the daemon's job looks whether a refit is due."""
RETRY_AFTER_S = 86400.0
"""An attempt that activated nothing is tried again no sooner than this (or `every`)."""
ALARM_SHARE_FLOOR = 0.01
"""Added to the canary's and the watch's limit: a baseline that never alarmed must not make a
single window over a new threshold a failure."""
JUDGED_WINDOWS = 100
"""Fewest windows a canary is judged on, and a watch rolls back on: with the 0.01 floor, one
window over the threshold among them never fails a baseline by itself."""
CANARY_WALL_FACTOR = 4.0
"""A canary that has not seen its data time and windows after this many times `canary` of wall
time (the source stalled) fails for too few windows."""
FOLLOW_INTERVAL_S = 0.5
"""How often a waiting refit looks whether its source's pipeline was restarted (a new stage)."""
KEEP_VERSIONS = 5
"""Saved baselines kept per source besides the current and previous one."""

Event = Literal[
    "refit_started",
    "refit_skipped",
    "refit_rejected",
    "refit_failed",
    "canary_started",
    "canary_passed",
    "canary_failed",
    "activated",
    "watch_ended",
    "rolled_back",
    "rollback_failed",
]


# -- canary and watch ----------------------------------------------------------------------------


@dataclass
class AlarmCount:
    """Windows a baseline scored, those over its threshold, and those it failed on."""

    scored: int = 0
    over: int = 0
    errors: int = 0

    @property
    def share(self) -> float | None:
        return self.over / self.scored if self.scored else None

    def as_dict(self) -> dict[str, Any]:
        share = self.share
        return {
            "scored": self.scored,
            "over": self.over,
            "errors": self.errors,
            "over_share": None if share is None else round(share, 4),
        }


def _elapsed_s(first: datetime | None, last: datetime | None) -> float:
    return 0.0 if first is None or last is None else (last - first).total_seconds()


class WindowJudge(ABC):
    """A `ScoreObserver` that judges the windows the source's stage scores, in data time: the
    first and last window it saw, and `done` once it has its verdict (windows after it are
    ignored). The canary and the watch differ in what they judge (`judge`)."""

    def __init__(self) -> None:
        self.first_ts: datetime | None = None
        self.last_ts: datetime | None = None
        self.done = asyncio.Event()

    def observe(
        self, vector: npt.NDArray[Any], ts: datetime, score: float | None, threshold: float
    ) -> None:
        if self.done.is_set():
            return
        self.first_ts = self.first_ts or ts
        self.last_ts = ts
        self.judge(vector, ts, score, threshold)

    @abstractmethod
    def judge(
        self, vector: npt.NDArray[Any], ts: datetime, score: float | None, threshold: float
    ) -> None:
        """One window the current baseline scored (`score` None: it failed to)."""

    @property
    def data_s(self) -> float:
        """Data time between the first and the last window seen."""
        return _elapsed_s(self.first_ts, self.last_ts)


class AlarmCanary(WindowJudge):
    """The refit's canary: the candidate scores every window the current baseline scores, with
    its own detector (debounce included); nothing it finds is journalled."""

    def __init__(self, settings: AnomalySettings, candidate: Baseline) -> None:
        super().__init__()
        self.refit = settings.refit
        self.candidate = candidate
        self.detector = AnomalyDetector(settings, candidate)
        self.judged_after = max(settings.min_windows, JUDGED_WINDOWS)
        self.tried = AlarmCount()
        self.current = AlarmCount()
        self.anomalies = 0
        """Anomalies the candidate's detector would have started."""
        self.last_error: str | None = None

    def judge(
        self, vector: npt.NDArray[Any], ts: datetime, score: float | None, threshold: float
    ) -> None:
        if score is None:
            self.current.errors += 1
        else:
            self.current.scored += 1
            self.current.over += score > threshold
        try:
            events = self.detector.observe(vector, ts)
        except Exception as exc:  # whatever the candidate raises fails it; never the pipeline
            self.tried.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.done.set()
            return
        self.tried.scored += 1
        self.tried.over += (self.detector.last_score or 0.0) > self.detector.threshold
        self.anomalies += sum(event.kind == "started" for event in events)
        if self.data_s >= self.refit.canary and self.tried.scored >= self.judged_after:
            self.done.set()

    @property
    def limit(self) -> float:
        return self.refit.max_alarm_ratio * (self.current.share or 0.0) + ALARM_SHARE_FLOOR

    def verdict(self) -> tuple[str, str] | None:
        """(cause, reason) when the candidate failed, None when it passed."""
        if self.tried.errors:
            return "error", f"the candidate failed on a window: {self.last_error}"
        if self.tried.scored < self.judged_after:
            return (
                "too_few_windows",
                f"{self.tried.scored} windows scored in shadow, fewer than {self.judged_after}",
            )
        share = self.tried.share or 0.0
        if share > self.limit:
            return (
                "alarm_share",
                f"{share:.1%} of the windows over the candidate's threshold, more than "
                f"{self.refit.max_alarm_ratio:g} x the current baseline's "
                f"{self.current.share or 0.0:.1%} + {ALARM_SHARE_FLOOR:.0%}",
            )
        return None

    def figures(self) -> dict[str, Any]:
        return {
            "candidate": self.tried.as_dict(),
            "current": self.current.as_dict(),
            "candidate_anomalies": self.anomalies,
            "limit_share": round(self.limit, 4),
            "data_s": round(self.data_s, 3),
            "from": None if self.first_ts is None else format_ts(self.first_ts),
            "to": None if self.last_ts is None else format_ts(self.last_ts),
        }


class AlarmWatch(WindowJudge):
    """The refit's watch on the newly activated baseline: trips on a scoring error, or on its
    alarm share over `limit` once `judged_after` windows were scored (or at the end with at
    least `min_windows`); done after `duration_s` of data time."""

    def __init__(
        self, *, limit: float, duration_s: float, judged_after: int, min_windows: int
    ) -> None:
        super().__init__()
        self.limit = limit
        self.duration_s = duration_s
        self.judged_after = judged_after
        self.min_windows = min_windows
        self.count = AlarmCount()
        self.tripped: tuple[str, str] | None = None

    @property
    def until(self) -> datetime | None:
        if self.first_ts is None:
            return None
        return self.first_ts + timedelta(seconds=self.duration_s)

    def judge(
        self, vector: npt.NDArray[Any], ts: datetime, score: float | None, threshold: float
    ) -> None:
        if score is None:
            self.count.errors += 1
            self.tripped = ("error", "the new baseline failed to score a window")
            self.done.set()
            return
        self.count.scored += 1
        self.count.over += score > threshold
        ended = self.data_s >= self.duration_s
        enough = self.judged_after if not ended else self.min_windows
        share = self.count.share or 0.0
        if self.count.scored >= enough and share > self.limit:
            self.tripped = (
                "alarm_share",
                f"{share:.1%} of {self.count.scored} windows over the new threshold, more than "
                f"the limit {self.limit:.1%}",
            )
            self.done.set()
        elif ended:
            self.done.set()

    def figures(self) -> dict[str, Any]:
        return {
            **self.count.as_dict(),
            "limit_share": round(self.limit, 4),
            "data_s": round(self.data_s, 3),
        }


# -- one source's refits -------------------------------------------------------------------------


class BaselineRefit:
    """Refits of one source's baseline, one at a time. `stage_of()` is the source's current
    `AnomalyStage` (a restarted pipeline has a new one), None while it has none."""

    def __init__(
        self,
        source: str,
        settings: AnomalySettings,
        journal: Journal,
        store: BaselineStore,
        stage_of: Callable[[], AnomalyStage | None],
    ) -> None:
        self.source = source
        self.settings = settings
        self.refit = settings.refit
        self.journal = journal
        self.store = store
        self.stage_of = stage_of
        self.records = ModelRecords(
            journal, fields={"source": source, "model": self.model}, model=self.model
        )
        self.trial: BaselineTrial | None = None
        self.last_result: dict[str, Any] | None = None
        self.last_attempt_mono: float | None = None

    @property
    def model(self) -> str:
        return f"{self.source}-baseline"

    @property
    def state(self) -> str:
        """idle, fitting, canary, activating or watching."""
        if self.trial is None:
            return "idle"
        return TRIAL_STATES.get(self.trial.phase, self.trial.phase)

    @property
    def candidate(self) -> str | None:
        return None if self.trial is None else self.trial.candidate_version

    @property
    def canary(self) -> AlarmCanary | None:
        return None if self.trial is None else self.trial.canary

    @property
    def watch(self) -> AlarmWatch | None:
        return None if self.trial is None else self.trial.watch_

    def describe(self) -> dict[str, Any]:
        """For the source's `anomaly` entry in health: `refit`."""
        canary, watch = self.canary, self.watch
        until = None if watch is None else watch.until
        return {
            "state": self.state,
            "candidate": self.candidate,
            "canary": None if canary is None else canary.figures(),
            "watch": None if watch is None else watch.figures(),
            "watch_until": None if until is None else format_ts(until),
            "last_result": self.last_result,
        }

    def not_due(self, now: datetime) -> str | None:
        """Why no refit may start at `now` (UTC), or None when one is due."""
        if self.state != "idle":
            return f"a refit is {self.state}"
        stage = self.stage_of()
        if stage is None or stage.baseline is None:
            return "no baseline scores the source yet"
        if not in_windows(self.refit.windows, now):
            return "outside refit.windows"
        age = (now - stage.baseline.fitted_at).total_seconds()
        if age < self.refit.every:
            return f"the baseline is {format_duration(max(age, 0.0))} old"
        if self.last_attempt_mono is not None:
            since = time.monotonic() - self.last_attempt_mono
            if since < min(self.refit.every, RETRY_AFTER_S):
                return f"the last attempt was {format_duration(since)} ago"
        return None

    async def run(self, trigger: str = "scheduled") -> Event:
        """One refit from start to its end (a watch included); its last record's event."""
        self.last_attempt_mono = time.monotonic()
        self.trial = BaselineTrial(self, trigger)
        try:
            last = await self.trial.run()
        finally:
            self.trial = None
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.store.prune, self.source, KEEP_VERSIONS)
        assert last is not None, "a refit always ends with a record"
        log.info("refit of %s: %s", self.source, last.event)
        return cast(Event, last.event)

    async def swap(self, baseline: Baseline, watch: AlarmWatch | None, cause: str) -> None:
        """Until the source's stage scores with `baseline`: asked to swap at its next window (a
        stage restarted meanwhile loads it from the store by itself)."""
        while True:
            stage = self.stage_of()
            if stage is None:
                await asyncio.sleep(FOLLOW_INTERVAL_S)
                continue
            if stage.baseline is not None and stage.baseline.version == baseline.version:
                stage.observe_with(watch)
                return
            done = stage.replace_baseline(baseline, observer=watch, cause=cause)
            while not done.is_set() and self.stage_of() is stage:
                await _wait(done, FOLLOW_INTERVAL_S)

    async def observe(
        self, observer: WindowJudge, done: asyncio.Event, version: str, wall_limit: float | None
    ) -> bool:
        """Keep `observer` on the source's stage (re-attached to a restarted stage scoring with
        `version`) until it is done, then take it off; False when `wall_limit` seconds ran out
        first."""
        deadline = None if wall_limit is None else time.monotonic() + wall_limit
        try:
            while not done.is_set():
                stage = self.stage_of()
                if (
                    stage is not None
                    and stage.observer is not observer
                    and stage.baseline is not None
                    and stage.baseline.version == version
                ):
                    stage.observe_with(observer)
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                await _wait(done, FOLLOW_INTERVAL_S)
            return True
        finally:
            stage = self.stage_of()
            if stage is not None and stage.observer is observer:
                stage.observe_with(None)


TRIAL_STATES = {"preparing": "fitting", "rolling_back": "watching"}
"""The refit's names for the lifecycle's phases, as the status page shows them."""


class BaselineTrial(ModelTrial):
    """One refit of a source's baseline through the model-trial lifecycle (`trial.py`): the
    candidate is fitted and validated in a child process, judged by its alarm share beside the
    current baseline, and swapped in (and back) between two windows of the source's stage."""

    def __init__(self, refit: BaselineRefit, trigger: str) -> None:
        super().__init__(refit.records)
        self.refit = refit
        self.settings = refit.settings
        self.trigger = trigger
        self.base: dict[str, Any] = {}
        self.current: Baseline | None = None
        self.candidate: Baseline | None = None
        self.candidate_version: str | None = None
        self.canary: AlarmCanary | None = None
        self.watch_: AlarmWatch | None = None
        self.canary_figures: dict[str, Any] = {}

    @property
    def watch_s(self) -> float:
        return self.settings.refit.watch

    async def prepare(self) -> dict[str, Any]:
        refit, settings = self.refit, self.settings
        stage = refit.stage_of()
        if stage is None or stage.baseline is None:
            raise TrialOver(Step("refit_skipped", {"reason": "no baseline scores the source"}))
        current = self.current = stage.baseline
        base = self.base = {"previous": current.version, "trigger": self.trigger}
        await self.records.write(
            Step(
                "refit_started",
                {
                    **base,
                    "version": None,
                    "method": settings.method,
                    "data_s": settings.refit.data,
                    "holdout": settings.refit.holdout,
                    "nice": settings.refit.nice,
                },
            )
        )
        job = RefitJob(
            data_dir=refit.journal.data_dir,
            baselines=refit.store.root,
            source=refit.source,
            settings=settings,
            names=current.names,
            current=current.version,
        )
        try:
            prepared = await run_in_child(prepare_candidate, job, nice=settings.refit.nice)
        except Exception as exc:  # the child died (killed, out of memory) or the fit crashed
            log.exception("refit of %s failed", refit.source)
            reason = f"{type(exc).__name__}: {exc}"
            body = {**base, "version": None, "cause": "fit", "reason": reason}
            raise TrialOver(Step("refit_failed", body)) from None
        if prepared.outcome != "validated" or prepared.version is None:
            event = "refit_skipped" if prepared.outcome == "skipped" else "refit_rejected"
            version = prepared.figures.get("version")
            body = {**base, "version": version, "reason": prepared.reason, **prepared.figures}
            raise TrialOver(Step(event, body))
        version = prepared.version
        base["version"] = self.candidate_version = version
        try:
            self.candidate = await asyncio.to_thread(refit.store.load, refit.source, version)
            self.canary = AlarmCanary(settings, self.candidate)
        except (OSError, BaselineError, ValueError) as exc:  # ValueError: it does not fit the stage
            body = {**base, "cause": "load", "reason": str(exc)}
            raise TrialOver(Step("refit_failed", body)) from None
        return {
            **base,
            "validation": prepared.figures,
            "canary_s": settings.refit.canary,
            "min_windows": self.canary.judged_after,
            "max_alarm_ratio": settings.refit.max_alarm_ratio,
        }

    async def shadow(self) -> dict[str, Any]:
        canary, current = self.canary, self.current
        assert canary is not None and current is not None
        wall_limit = self.settings.refit.canary * CANARY_WALL_FACTOR
        judged = await self.refit.observe(canary, canary.done, current.version, wall_limit)
        verdict = canary.verdict()
        if not judged:
            verdict = (
                "too_few_windows",
                f"no verdict after {format_duration(wall_limit)}: {canary.tried.scored} windows "
                f"scored in shadow by then (the source was quiet, or stopped)",
            )
        figures = self.canary_figures = canary.figures()
        if verdict is not None:
            cause, reason = verdict
            body = {**self.base, "cause": cause, "reason": reason, "canary": figures}
            raise TrialOver(Step("canary_failed", body))
        return {**self.base, "canary": figures}

    async def activate(self) -> dict[str, Any]:
        refit, canary, candidate = self.refit, self.canary, self.candidate
        assert canary is not None and candidate is not None
        figures, settings = self.canary_figures, self.settings.refit
        try:
            await asyncio.to_thread(refit.store.activate, refit.source, candidate.version)
        except (OSError, BaselineError) as exc:
            body = {**self.base, "cause": "activation", "reason": str(exc), "canary": figures}
            raise TrialOver(Step("canary_failed", body)) from None
        watch = AlarmWatch(
            limit=settings.max_alarm_ratio * (canary.current.share or 0.0) + ALARM_SHARE_FLOOR,
            duration_s=settings.watch,
            judged_after=canary.judged_after,
            min_windows=self.settings.min_windows,
        )
        await refit.swap(candidate, watch if settings.watch else None, "refit")
        if not settings.watch:
            return {**self.base, "canary": figures, "watch_s": 0}
        self.watch_ = watch
        return {
            **self.base,
            "canary": figures,
            "watch_s": settings.watch,
            "limit_share": watch.limit,
        }

    async def watch(self) -> tuple[str, str] | None:
        watch, candidate = self.watch_, self.candidate
        assert watch is not None and candidate is not None
        await self.refit.observe(watch, watch.done, candidate.version, None)
        return watch.tripped

    def watch_ended(self) -> dict[str, Any]:
        assert self.watch_ is not None
        return {**self.base, "watch": self.watch_.figures()}

    async def roll_back(self, cause: str, detail: str) -> Step:
        refit, watch = self.refit, self.watch_
        assert watch is not None
        figures = {"cause": cause, "reason": detail, "watch": watch.figures()}
        try:
            restored = await asyncio.to_thread(refit.store.rollback, refit.source)
            previous = await asyncio.to_thread(refit.store.load, refit.source, restored)
        except (OSError, BaselineError) as exc:
            body = {**self.base, **figures, "error": str(exc)}
            return Step("rollback_failed", body, Priority.ALERT)
        await refit.swap(previous, None, "rolled_back")
        return Step(
            "rolled_back", {**self.base, **figures, "active": previous.version}, Priority.ALERT
        )

    def ended(self, last: Step | None) -> None:
        if last is not None:
            self.refit.last_result = {
                "event": last.event,
                "at": format_ts(datetime.now(UTC)),
                "version": last.body.get("version"),
                "reason": last.body.get("reason"),
            }

    async def close(self) -> None:
        """Nothing to release: the candidate is a file in the store, the stage owns its baseline."""


# -- the daemon's refits ---------------------------------------------------------------------------


class BaselineRefits:
    """Every source with `anomaly.refit.enabled`: the daemon's `refit` job calls `tick`; each
    refit runs as its own task, cancelled (its child process killed) when the daemon stops."""

    def __init__(
        self,
        cfg: ApplianceConfig,
        journal: Journal,
        pipelines: Mapping[str, SourcePipeline],
        store: BaselineStore | None = None,
    ) -> None:
        """`pipelines`: the daemon's, by source name (a restarted source's new one replaces
        the old)."""
        store = store or BaselineStore.in_data_dir(cfg.appliance.data_dir)
        self.refits = {
            sensor.name: BaselineRefit(
                sensor.name, sensor.anomaly, journal, store, _stage_of(pipelines, sensor.name)
            )
            for sensor in cfg.sensors
            if sensor.anomaly is not None and sensor.anomaly.refit.enabled
        }
        self._tasks: dict[str, asyncio.Task[Event | None]] = {}

    def describers(self) -> dict[str, Callable[[], dict[str, Any]]]:
        return {name: refit.describe for name, refit in self.refits.items()}

    def running(self, source: str) -> asyncio.Task[Event | None] | None:
        """The refit of `source` in progress, if any."""
        return self._tasks.get(source)

    async def tick(self) -> None:
        now = datetime.now(UTC)
        for name, refit in self.refits.items():
            if name not in self._tasks and refit.not_due(now) is None:
                self.start(name, "scheduled")

    def start(self, source: str, trigger: str) -> str | None:
        """Start a refit of `source` now (whatever its schedule); why not, or None."""
        refit = self.refits.get(source)
        if refit is None:
            return f"{source!r} has no anomaly.refit enabled"
        if source in self._tasks:
            return f"a refit of {source} is {refit.state}"
        stage = refit.stage_of()
        if stage is None or stage.baseline is None:
            return f"no baseline scores {source} yet"
        task = asyncio.create_task(self._guarded(refit, trigger), name=f"refit:{source}")
        self._tasks[source] = task
        task.add_done_callback(lambda _: self._tasks.pop(source, None))
        return None

    async def _guarded(self, refit: BaselineRefit, trigger: str) -> Event | None:
        try:
            return await refit.run(trigger)
        except Exception:  # a bug here must not take the daemon down; the next tick retries
            log.exception("refit of %s failed unexpectedly", refit.source)
            return None

    async def __aenter__(self) -> BaselineRefits:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set, for `seconds` at most."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _stage_of(
    pipelines: Mapping[str, SourcePipeline], name: str
) -> Callable[[], AnomalyStage | None]:
    def stage() -> AnomalyStage | None:
        pipeline = pipelines.get(name)
        return None if pipeline is None else pipeline.anomaly

    return stage


__all__ = [
    "ALARM_SHARE_FLOOR",
    "CHECK_INTERVAL_S",
    "JUDGED_WINDOWS",
    "AlarmCanary",
    "AlarmWatch",
    "BaselineRefit",
    "BaselineRefits",
    "WindowJudge",
]
