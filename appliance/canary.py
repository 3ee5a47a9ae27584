"""Owns trying a staged model in shadow, activating it and watching it.

For each `package:NAME` detector that cameras use, a staged version runs beside the active one
on a sample of the frames the active one analyses (every `sample_every`th; its own executor
thread; a bounded queue whose overflow is counted, never the camera's frames). After
`model_packages.canary.duration` and `min_frames`, its agreement with the active model, its
latency ratio and its error rate are judged against the manifest's `canary` limits (else the
config's). A pass activates it atomically: the store's pointer first, then every camera's
detector in one step between two frames (it was opened and warmed up as the shadow, so no frame
waits). A failure refuses it in the store, so it is never tried again by itself. After an
activation a watch rolls it back by itself on a load error, p95 latency over budget or an error
rate over the limit. Every step is a `model` record (source `models`) that ships like any other.

One run at a time per package: a version staged while another is tried (or watched) waits for it
and is then compared with whatever is active by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from appliance.model_store import ModelStore
from appliance.vision import DetectorPool
from config import ApplianceConfig
from config.models import CanarySettings
from inference.detect import OnnxDetector, open_detector
from inference.detections import Detection
from inference.packages import PREFIX, CanaryLimits, VerifiedPackage, detector_settings
from inference.session import ModelError
from sync import Journal, NewRecord, Priority, StorageFull
from sync.records import format_ts

log = logging.getLogger(__name__)

RECORD_SOURCE = "models"
RECORD_KIND = "model"
MATCH_IOU = 0.5  # two detections of one class agree when they overlap at least this much
# How often a shadow run looks whether it can be judged, and a watch whether the model behaves.
CHECK_INTERVAL_S = 0.5

Image = npt.NDArray[np.uint8]


# -- comparing two models' detections ------------------------------------------------------------


def frame_agreement(
    active: Sequence[Detection], shadow: Sequence[Detection], *, min_iou: float = MATCH_IOU
) -> float:
    """How far the shadow's detections in one frame agree with the active model's: F1 of one to
    one matches (same label, IoU >= `min_iou`, best overlaps first), 2 * matched / (n_active +
    n_shadow); a frame where both find nothing agrees fully."""
    if not active and not shadow:
        return 1.0
    if not active or not shadow:
        return 0.0
    a = np.array([(d.x1, d.y1, d.x2, d.y2) for d in active], dtype=np.float64)
    s = np.array([(d.x1, d.y1, d.x2, d.y2) for d in shadow], dtype=np.float64)
    width = np.minimum(a[:, None, 2], s[None, :, 2]) - np.maximum(a[:, None, 0], s[None, :, 0])
    height = np.minimum(a[:, None, 3], s[None, :, 3]) - np.maximum(a[:, None, 1], s[None, :, 1])
    inter = width.clip(0) * height.clip(0)
    area_a = ((a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0))[:, None]
    area_s = ((s[:, 2] - s[:, 0]).clip(0) * (s[:, 3] - s[:, 1]).clip(0))[None, :]
    union = area_a + area_s - inter
    overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    same = np.array([[x.label == y.label for y in shadow] for x in active], dtype=bool)
    overlap[~same] = 0.0
    rows, cols = np.nonzero(overlap >= min_iou)
    order = np.argsort(-overlap[rows, cols], kind="stable")
    used_active: set[int] = set()
    used_shadow: set[int] = set()
    for i, j in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        if i not in used_active and j not in used_shadow:
            used_active.add(i)
            used_shadow.add(j)
    return 2 * len(used_active) / (len(active) + len(shadow))


def _shadow_frame(detector: OnnxDetector, image: Image, found: Sequence[Detection]) -> float:
    """On the shadow model's own executor thread: its detections on `image` and their agreement
    with the active model's `found`."""
    return frame_agreement(found, detector.detect_blocking(image))


# -- limits and figures ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """What a shadow run must meet: the manifest's `canary` limits, the config's where it has
    none."""

    min_agreement: float
    max_latency_ratio: float
    max_error_rate: float

    @classmethod
    def resolve(cls, manifest: CanaryLimits | None, settings: CanarySettings) -> Limits:
        given = manifest or CanaryLimits()
        return cls(
            min_agreement=settings.min_agreement
            if given.min_agreement is None
            else given.min_agreement,
            max_latency_ratio=settings.max_latency_ratio
            if given.max_latency_ratio is None
            else given.max_latency_ratio,
            max_error_rate=settings.max_error_rate
            if given.max_error_rate is None
            else given.max_error_rate,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "min_agreement": self.min_agreement,
            "max_latency_ratio": self.max_latency_ratio,
            "max_error_rate": self.max_error_rate,
        }


@dataclass
class ShadowMetrics:
    """What a shadow run saw: frames handed to it, compared, failed, dropped (queue full)."""

    sampled: int = 0
    compared: int = 0
    errors: int = 0
    dropped: int = 0
    agreement_sum: float = 0.0
    last_error: str | None = None

    @property
    def tried(self) -> int:
        return self.compared + self.errors

    @property
    def agreement(self) -> float | None:
        return self.agreement_sum / self.compared if self.compared else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.tried if self.tried else None


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _now() -> str:
    return format_ts(datetime.now(UTC))


def _in(seconds: float) -> str:
    return format_ts(datetime.now(UTC) + timedelta(seconds=seconds))


# -- a shadow run ------------------------------------------------------------------------------------


class ShadowTap:
    """The `ShadowSink` of one model key: every `every`th frame its cameras analyse goes to the
    run's queue. Called on the camera's hot path: a counter and, now and then, a put_nowait."""

    def __init__(self, run: ShadowRun, key: str, every: int) -> None:
        self._run = run
        self._key = key
        self._every = every
        self._seen = 0

    def offer(self, image: Image, found: Sequence[Detection]) -> None:
        self._seen += 1
        if self._seen % self._every == 0:
            self._run.submit(self._key, image, tuple(found))


class ShadowRun:
    """One staged version tried beside the active one: its shadow detector per model key, the
    bounded queue of sampled frames and what came of them."""

    def __init__(
        self,
        name: str,
        version: str,
        previous: str,
        shadows: dict[str, OnnxDetector],
        limits: Limits,
        settings: CanarySettings,
    ) -> None:
        self.name = name
        self.version = version
        self.previous = previous
        self.shadows = shadows
        self.limits = limits
        self.settings = settings
        self.metrics = ShadowMetrics()
        self.queue: asyncio.Queue[tuple[str, Image, tuple[Detection, ...]]] = asyncio.Queue(
            settings.queue
        )
        self.taps = {key: ShadowTap(self, key, settings.sample_every) for key in shadows}
        self.started_mono = time.monotonic()
        self.started_at = _now()
        self.ends_at = _in(settings.duration)

    def submit(self, key: str, image: Image, found: tuple[Detection, ...]) -> None:
        self.metrics.sampled += 1
        try:
            self.queue.put_nowait((key, image, found))
        except asyncio.QueueFull:
            self.metrics.dropped += (
                1  # the shadow is behind: its sample thins, the camera is untouched
            )

    async def work(self) -> None:
        """Run the shadow on each queued frame, one at a time, on the shadow's own thread."""
        while True:
            key, image, found = await self.queue.get()
            detector = self.shadows[key]
            try:
                agreement = await detector.session.call(_shadow_frame, detector, image, found)
            except (ModelError, ValueError) as exc:
                self.metrics.errors += 1
                self.metrics.last_error = str(exc)
                continue
            self.metrics.compared += 1
            self.metrics.agreement_sum += agreement

    def latency(self, pool: DetectorPool) -> tuple[float | None, float | None, float | None]:
        """(ratio, shadow p95 ms, active p95 ms) of the model key where the shadow is slowest
        relative to the detector that key runs now."""
        worst: tuple[float | None, float | None, float | None] = (None, None, None)
        for key, shadow in self.shadows.items():
            active = pool.current(key)
            shadow_p95 = shadow.stats.p95_ms
            active_p95 = None if active is None else active.stats.p95_ms
            if shadow_p95 is None or not active_p95:
                continue
            ratio = shadow_p95 / active_p95
            if worst[0] is None or ratio > worst[0]:
                worst = (ratio, shadow_p95, active_p95)
        return worst

    def figures(self, pool: DetectorPool) -> dict[str, Any]:
        ratio, shadow_p95, active_p95 = self.latency(pool)
        m = self.metrics
        return {
            "frames": m.compared,
            "sampled": m.sampled,
            "errors": m.errors,
            "dropped": m.dropped,
            "agreement": _rounded(m.agreement),
            "latency_ratio": _rounded(ratio, 3),
            "error_rate": _rounded(m.error_rate),
            "shadow_p95_ms": _rounded(shadow_p95, 3),
            "active_p95_ms": _rounded(active_p95, 3),
        }

    def failures(self, pool: DetectorPool, *, too_few: bool) -> list[dict[str, Any]]:
        """Each limit the run did not meet: metric, value, limit, threshold and a sentence."""
        limits, m = self.limits, self.metrics
        found: list[dict[str, Any]] = []

        def failed(metric: str, value: float | int | None, limit: str, threshold: float) -> None:
            shown = "none" if value is None else f"{value:.3f}"
            relation = ">" if limit.startswith("max_") else "<"
            found.append(
                {
                    "metric": metric,
                    "value": _rounded(None if value is None else float(value)),
                    "limit": limit,
                    "threshold": threshold,
                    "text": f"{metric} {shown} {relation} {limit} {threshold:g}",
                }
            )

        if too_few:
            failed("frames", m.tried, "min_frames", self.settings.min_frames)
            found[-1]["text"] = (
                f"frames {m.tried} < min_frames {self.settings.min_frames} within max_duration "
                f"{self.settings.max_duration:g}s"
            )
        agreement = m.agreement
        if agreement is None or agreement < limits.min_agreement:
            failed("agreement", agreement, "min_agreement", limits.min_agreement)
        ratio = self.latency(pool)[0]
        if ratio is not None and ratio > limits.max_latency_ratio:
            failed("latency_ratio", ratio, "max_latency_ratio", limits.max_latency_ratio)
        error_rate = m.error_rate
        if error_rate is not None and error_rate > limits.max_error_rate:
            failed("error_rate", error_rate, "max_error_rate", limits.max_error_rate)
        return found

    async def aclose(self) -> None:
        for shadow in self.shadows.values():
            await shadow.aclose()


# -- the watch after an activation ---------------------------------------------------------------


@dataclass
class Watch:
    """A version activated by its canary, watched until `until_mono`: the detectors it replaced
    stay open meanwhile, so a rollback is a swap back, not a reload."""

    name: str
    version: str
    previous: str
    limits: Limits
    until_mono: float
    until: str
    watched: dict[str, OnnxDetector]
    retired: dict[str, OnnxDetector | None]
    budget_ms: dict[str, float | None]
    # Per key: (runs tried, errors) at each check, trimmed to the last `min_frames` runs.
    history: dict[str, deque[tuple[int, int]]] = field(default_factory=dict)
    load_errors: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        by_key = {}
        for key, detector in self.watched.items():
            stats = detector.stats
            by_key[key] = {
                "p95_ms": _rounded(stats.p95_ms, 3),
                "budget_ms": _rounded(self.budget_ms.get(key), 3),
                "runs": stats.count,
                "errors": stats.errors,
            }
        return {"models": by_key, "load_errors": list(self.load_errors)}


class UnknownClasses(ModelError):
    """A staged model that lacks a class a camera of its model names (filter, blur or zone)."""


class _Staged(Protocol):
    """What model_updates reports for a staged package (its StagedPackage)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


@dataclass
class _Package:
    """The canary's state for one package name."""

    name: str
    keys: list[str]  # model keys (config `models`) that load package:NAME and cameras use
    pending: str | None = None
    task: asyncio.Task[None] | None = None
    run: ShadowRun | None = None
    watch: Watch | None = None
    last_canary: dict[str, Any] | None = None
    last_watch: dict[str, Any] | None = None


# -- the manager -------------------------------------------------------------------------------------


class ModelCanaries:
    """Canaries, activations and watches of every `package:NAME` detector the cameras use. An
    async context manager (entering it looks for staged versions left untried, e.g. by a restart;
    leaving it stops what runs and closes the detectors it holds); `consider` starts a run."""

    def __init__(
        self,
        cfg: ApplianceConfig,
        pool: DetectorPool,
        journal: Journal,
        *,
        store: ModelStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.settings = cfg.model_packages.canary
        self.pool = pool
        self.journal = journal
        self.store = store or pool.packages
        used = {camera.model for camera in cfg.cameras}
        keys_by_name: dict[str, list[str]] = {}
        for key, model in sorted(cfg.models.items()):
            if key in used and model.path.startswith(PREFIX):
                keys_by_name.setdefault(model.path.removeprefix(PREFIX), []).append(key)
        self.packages = {name: _Package(name, keys) for name, keys in keys_by_name.items()}
        self._package_of = {key: p for p in self.packages.values() for key in p.keys}
        self._entered = False

    async def __aenter__(self) -> ModelCanaries:
        self._entered = True
        self.pool.on_load_error = self._load_failed
        if self.settings.enabled:
            for name in self.packages:
                version = await asyncio.to_thread(self._untried, name)
                if version is not None:
                    await self.consider(name, version)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered = False
        self.pool.on_load_error = None
        for package in self.packages.values():
            task = package.task
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- entry points ----------------------------------------------------------------------------

    async def consider(self, name: str, version: str) -> None:
        """Try `version` of package `name` in shadow, after whatever runs for `name` now (a
        newer call replaces a version still waiting). Returns at once."""
        if not self._entered:
            raise RuntimeError("enter ModelCanaries before asking it to consider a version")
        package = self.packages.get(name)
        if not self.settings.enabled or package is None:
            why = "canary disabled" if package is not None else "no camera uses package:" + name
            log.info(
                "staged model left for a manual activation",
                extra={"fields": {"package": name, "version": version, "why": why}},
            )
            return
        package.pending = version
        if package.task is None or package.task.done():
            package.task = asyncio.create_task(self._drive(package), name=f"canary:{name}")

    async def staged(self, staged: _Staged) -> None:
        """model_updates' listener: a package was pulled and staged."""
        await self.consider(staged.name, staged.version)

    def describers(self) -> dict[str, Callable[[], dict[str, Any]]]:
        """Per package, what the health snapshot shows under models.packages."""
        return {name: partial(self.describe, name) for name in self.packages}

    def describe(self, name: str) -> dict[str, Any]:
        package = self.packages[name]
        entry: dict[str, Any] = {"active": None, "previous": None}
        try:
            entry["active"], entry["previous"] = self.store.pointer(name)
        except ModelError as exc:
            entry["error"] = str(exc)
        run = package.run
        if run is not None:
            entry["canary"] = {
                "state": "running",
                "version": run.version,
                "started_at": run.started_at,
                "ends_at": run.ends_at,
                **run.figures(self.pool),
            }
        else:
            entry["canary"] = package.last_canary
        watch = package.watch
        if watch is not None:
            entry["watch"] = {
                "state": "watching",
                "version": watch.version,
                "until": watch.until,
                **watch.figures(),
            }
        else:
            entry["watch"] = package.last_watch
        entry["pending"] = package.pending
        return entry

    # -- one package's runs ------------------------------------------------------------------------

    async def _drive(self, package: _Package) -> None:
        while package.pending is not None:
            version, package.pending = package.pending, None
            try:
                watch = await self._try(package, version)
                if watch is not None:
                    await self._watch(package, watch)
            except Exception as exc:  # a bug here must not take the cameras down
                log.exception(
                    "canary failed unexpectedly",
                    extra={"fields": {"package": package.name, "version": version}},
                )
                await self._record(
                    "canary_failed",
                    {
                        "name": package.name,
                        "version": version,
                        "cause": "internal",
                        "reason": f"{type(exc).__name__}: {exc}",
                    },
                )

    def _untried(self, name: str) -> str | None:
        """The newest staged version imported after the active one and never active (nor
        refused): a canary that a restart interrupted, or a package staged meanwhile."""
        entries = [e for e in self.store.entries() if e.name == name]
        active = next((e for e in entries if e.state == "active"), None)
        if active is None:
            return None
        ever_active = {
            event.get("version")
            for event in self.store.history()
            if event.get("name") == name and event.get("action") in ("activate", "rollback")
        }
        candidates = [
            e
            for e in entries
            if e.state == "staged"
            and e.task == "detector"
            and e.imported_at > active.imported_at
            and e.version not in ever_active
        ]
        return max(candidates, key=lambda e: e.imported_at).version if candidates else None

    async def _try(self, package: _Package, version: str) -> Watch | None:
        """The shadow run of `version`; the watch to keep when it passed and was activated."""
        name = package.name
        active, _ = await asyncio.to_thread(self.store.pointer, name)
        if version == active:
            return None
        base: dict[str, Any] = {"name": name, "version": version, "previous": active}
        if active is None:
            reason = (
                f"{name} has no active version to compare with; activate one by hand: "
                f"appliance models activate {name} VERSION"
            )
            package.last_canary = {"state": "failed", "version": version, "reason": reason}
            await self._record("canary_failed", {**base, "cause": "no_active", "reason": reason})
            return None
        refusal = await asyncio.to_thread(self.store.refusal, name, version)
        if refusal is not None:
            log.info(
                "refused model not tried again",
                extra={"fields": {"package": name, "version": version, "reason": refusal}},
            )
            return None
        try:
            verified = await asyncio.to_thread(self.store.resolve_version, name, version)
        except ModelError as exc:
            await self._refuse(package, base, "unverifiable", str(exc))
            return None
        if verified.manifest.task != "detector":
            log.info(
                "not a detector package; no canary",
                extra={"fields": {"package": name, "version": version}},
            )
            return None
        limits = Limits.resolve(verified.manifest.canary, self.settings)
        try:
            shadows = await self._open_shadows(package, verified)
        except UnknownClasses as exc:
            await self._refuse(package, base, "labels", str(exc), limits=limits)
            return None
        except ModelError as exc:
            await self._refuse(package, base, "load_error", str(exc), limits=limits)
            return None
        run = ShadowRun(name, version, active, shadows, limits, self.settings)
        try:
            too_few = await self._shadow(package, run)
            figures = run.figures(self.pool)
            failures = run.failures(self.pool, too_few=too_few)
            body = {**base, "metrics": figures, "limits": limits.as_dict()}
            if failures:
                reason = "; ".join(f["text"] for f in failures)
                await self._refuse(package, body, failures[0]["metric"], reason, failed=failures)
                return None
            package.last_canary = {"state": "passed", "version": version, **figures}
            await self._record("canary_passed", body)
            return await self._activate(package, run, figures)
        finally:
            await run.aclose()

    async def _open_shadows(
        self, package: _Package, verified: VerifiedPackage
    ) -> dict[str, OnnxDetector]:
        """One warm detector of the staged version per model key, configured as that key is;
        a model that does not know a class its cameras name is refused like a failed load."""
        shadows: dict[str, OnnxDetector] = {}
        try:
            for key in package.keys:
                settings, labels = detector_settings(self.cfg.models[key], verified)
                detector = await asyncio.to_thread(
                    partial(OnnxDetector, settings, verified.model_path, key, labels=labels)
                )
                shadows[key] = detector
                for camera in self.cfg.cameras:
                    if camera.model != key:
                        continue
                    named = {*camera.classes, *camera.blur_classes}
                    named |= {c for zone in camera.zones for c in zone.classes}
                    unknown = sorted(named - set(detector.labels))
                    if unknown:
                        raise UnknownClasses(
                            verified.model_path,
                            f"camera {camera.name!r} names classes {unknown} that "
                            f"{verified.ref} does not know",
                        )
        except BaseException:
            for detector in shadows.values():
                await detector.aclose()
            raise
        return shadows

    async def _shadow(self, package: _Package, run: ShadowRun) -> bool:
        """Feed the shadow until it can be judged; True when max_duration ran out first."""
        settings = self.settings
        await self._record(
            "canary_started",
            {
                "name": run.name,
                "version": run.version,
                "previous": run.previous,
                "models": sorted(run.shadows),
                "limits": run.limits.as_dict(),
                "sample_every": settings.sample_every,
                "duration_s": settings.duration,
                "min_frames": settings.min_frames,
                "ends_at": run.ends_at,
            },
        )
        package.run = run
        worker = asyncio.create_task(run.work(), name=f"canary-shadow:{run.name}")
        for key, tap in run.taps.items():
            self.pool.attach_shadow(key, tap)
        try:
            while True:
                await asyncio.wait([worker], timeout=CHECK_INTERVAL_S)
                if worker.done():
                    worker.result()  # a bug in the worker: raise it here
                    raise RuntimeError("the shadow worker stopped")
                elapsed = time.monotonic() - run.started_mono
                if elapsed >= settings.duration and run.metrics.tried >= settings.min_frames:
                    return False
                if elapsed >= settings.max_duration:
                    return True
        finally:
            for key in run.taps:
                self.pool.attach_shadow(key, None)
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            package.run = None

    async def _activate(
        self, package: _Package, run: ShadowRun, figures: dict[str, Any]
    ) -> Watch | None:
        """Store pointer first, then every camera's detector in one step; the watch that
        follows (None when the activation did not happen)."""
        name, version = run.name, run.version
        base = {"name": name, "version": version, "previous": run.previous, "metrics": figures}
        active, _ = await asyncio.to_thread(self.store.pointer, name)
        if active != run.previous:
            # Someone activated another version meanwhile (`appliance models activate`): this
            # run compared against a model that is no longer the active one.
            package.last_canary = {"state": "superseded", "version": version, **figures}
            await self._record(
                "canary_failed",
                {
                    **base,
                    "cause": "superseded",
                    "reason": f"the active version changed from {run.previous} to {active} "
                    "during the canary",
                },
            )
            return None
        try:
            await asyncio.to_thread(self.store.activate, name, version)
        except ModelError as exc:
            await self._refuse(package, base, "activation", str(exc))
            return None
        budget_ratio = self.settings.latency_budget_ratio or run.limits.max_latency_ratio
        budget_ms: dict[str, float | None] = {}
        for key in run.shadows:
            current = self.pool.current(key)
            p95 = None if current is None else current.stats.p95_ms
            budget_ms[key] = None if p95 is None else p95 * budget_ratio
        # One step, no await: every camera of every key runs the new model from its next frame.
        handed, run.shadows = run.shadows, {}  # the pool owns them now
        retired = {key: self.pool.swap(key, detector) for key, detector in handed.items()}
        watch = Watch(
            name=name,
            version=version,
            previous=run.previous,
            limits=run.limits,
            until_mono=time.monotonic() + self.settings.watch,
            until=_in(self.settings.watch),
            watched=handed,
            retired=retired,
            budget_ms=budget_ms,
        )
        for key, detector in watch.watched.items():
            stats = detector.stats
            watch.history[key] = deque([(stats.count + stats.errors, stats.errors)])
        await self._record(
            "activated",
            {
                **base,
                "watch_until": watch.until if self.settings.watch else None,
                "latency_budget_ms": {k: _rounded(v, 3) for k, v in budget_ms.items()},
            },
        )
        log.info(
            "model activated by its canary",
            extra={"fields": {"package": name, "version": version, "previous": run.previous}},
        )
        return watch

    async def _watch(self, package: _Package, watch: Watch) -> None:
        package.watch = watch
        rolled_back = False
        try:
            while time.monotonic() < watch.until_mono:
                await asyncio.sleep(min(CHECK_INTERVAL_S, watch.until_mono - time.monotonic()))
                problem = self._misbehaving(watch)
                if problem is not None:
                    rolled_back = await self._roll_back(package, watch, *problem)
                    return
            package.last_watch = {"state": "ended", "version": watch.version, **watch.figures()}
            if not self.settings.watch:
                return
            await self._record(
                "watch_ended",
                {
                    "name": watch.name,
                    "version": watch.version,
                    "previous": watch.previous,
                    "metrics": watch.figures(),
                },
            )
        finally:
            package.watch = None
            if not rolled_back:
                for detector in watch.retired.values():
                    if detector is not None:
                        await detector.aclose()

    def _misbehaving(self, watch: Watch) -> tuple[str, str] | None:
        """(cause, detail) when the watched model must go: a load error, its error rate over the
        last `min_frames` runs above the limit, or its p95 latency above the budget."""
        if watch.load_errors:
            return "load_error", watch.load_errors[0]
        enough = self.settings.min_frames
        for key, detector in watch.watched.items():
            if self.pool.current(key) is not detector:
                continue  # swapped away by someone else: not this watch's model any more
            stats = detector.stats
            tried, errors = stats.count + stats.errors, stats.errors
            history = watch.history[key]
            history.append((tried, errors))
            while len(history) > 1 and tried - history[1][0] >= enough:
                history.popleft()
            since_tried, since_errors = history[0]
            window = tried - since_tried
            if window < enough:
                continue
            rate = (errors - since_errors) / window
            if rate > watch.limits.max_error_rate:
                return (
                    "error_rate",
                    f"{key}: {errors - since_errors} of its last {window} runs failed (error "
                    f"rate {rate:.3f} > max_error_rate {watch.limits.max_error_rate:g})",
                )
            budget = watch.budget_ms.get(key)
            p95 = stats.p95_ms
            if budget is not None and p95 is not None and p95 > budget:
                return (
                    "latency",
                    f"{key}: p95 latency {p95:.1f} ms > budget {budget:.1f} ms (the previous "
                    "model's p95 times the latency budget ratio)",
                )
        return None

    async def _roll_back(self, package: _Package, watch: Watch, cause: str, detail: str) -> bool:
        """The previous version back: the store's pointer, then every camera in one step; the
        bad version refused. True when the cameras run the previous model again."""
        name = watch.name
        figures = watch.figures()
        base = {"name": name, "version": watch.version, "previous": watch.previous}
        try:
            await asyncio.to_thread(self.store.rollback, name)
        except ModelError as exc:
            package.last_watch = {"state": "rollback_failed", "version": watch.version}
            await self._record(
                "rollback_failed",
                {**base, "cause": cause, "detail": detail, "error": str(exc), "metrics": figures},
                priority=Priority.ALERT,
            )
            return False
        restore: dict[str, OnnxDetector] = {}
        not_restored: dict[str, str] = {}
        for key, old in watch.retired.items():
            if old is not None:
                restore[key] = old
                continue
            # No camera ran this key at activation: open the restored version now.
            try:
                restore[key] = await asyncio.to_thread(
                    open_detector, self.cfg.models[key], key, packages=self.store
                )
            except ModelError as exc:
                not_restored[key] = str(exc)
        # One step, no await: the cameras run the previous model from their next frame.
        replaced = [self.pool.swap(key, detector) for key, detector in restore.items()]
        for detector in replaced:
            if detector is not None:
                await detector.aclose()
        reason = f"{cause}: {detail}"
        with contextlib.suppress(ModelError):
            await asyncio.to_thread(self.store.refuse, name, watch.version, reason)
        package.last_watch = {
            "state": "rolled_back",
            "version": watch.version,
            "cause": cause,
            "detail": detail,
        }
        await self._record(
            "rolled_back",
            {
                **base,
                "active": watch.previous,
                "cause": cause,
                "detail": detail,
                "metrics": figures,
                "not_restored": not_restored,
            },
            priority=Priority.ALERT,
        )
        log.warning(
            "model rolled back",
            extra={"fields": {"package": name, "version": watch.version, "cause": reason}},
        )
        return not not_restored

    def _load_failed(self, key: str, exc: ModelError) -> None:
        """The pool could not open model `key`: during a watch of its package, a rollback."""
        package = self._package_of.get(key)
        if package is not None and package.watch is not None:
            package.watch.load_errors.append(f"{key}: {exc}")

    # -- records -------------------------------------------------------------------------------------

    async def _refuse(
        self,
        package: _Package,
        body: dict[str, Any],
        cause: str,
        reason: str,
        *,
        limits: Limits | None = None,
        failed: list[dict[str, Any]] | None = None,
    ) -> None:
        """A `canary_failed` record, and the version marked refused in the store."""
        version = str(body["version"])
        full = {**body, "cause": cause, "reason": reason}
        if limits is not None:
            full["limits"] = limits.as_dict()
        if failed is not None:
            full["failed"] = failed
        package.last_canary = {
            "state": "failed",
            "version": version,
            "cause": cause,
            "reason": reason,
            **(body.get("metrics") or {}),
        }
        try:
            await asyncio.to_thread(self.store.refuse, package.name, version, reason)
        except ModelError as exc:
            full["refuse_error"] = str(exc)
        await self._record("canary_failed", full)
        log.warning(
            "staged model refused by its canary",
            extra={"fields": {"package": package.name, "version": version, "reason": reason}},
        )

    async def _record(
        self, event: str, body: dict[str, Any], *, priority: Priority = Priority.EVENT
    ) -> None:
        try:
            await self.journal.append(
                NewRecord(
                    source=RECORD_SOURCE,
                    kind=RECORD_KIND,
                    priority=priority,
                    body={"event": event, **body},
                )
            )
        except StorageFull:
            log.warning(
                "model record not journalled: storage full",
                extra={"fields": {"event": event, "package": body.get("name")}},
            )


__all__ = [
    "MATCH_IOU",
    "Limits",
    "ModelCanaries",
    "ShadowMetrics",
    "ShadowRun",
    "ShadowTap",
    "Watch",
    "frame_agreement",
]
