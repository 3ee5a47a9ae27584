"""Owns the detector canary: trying a staged model in shadow, activating it and watching it.

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
The steps are the model-trial lifecycle of `trial.py` (shared with the baseline refit); the
shadow run and its figures are `shadow.py`'s.

One run at a time per package: a version staged while another is tried (or watched) waits for it
and is then compared with whatever is active by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Protocol

from appliance.models.shadow import (
    CHECK_INTERVAL_S,
    DetectorWatch,
    Limits,
    ShadowRun,
    rounded,
    utc_in,
)
from appliance.models.store import ModelStore
from appliance.models.trial import ModelRecords, ModelTrial, Step, TrialOver
from appliance.stages.vision import DetectorPool
from config import ApplianceConfig
from inference.detect import OnnxDetector, open_detector
from inference.packages import PREFIX, VerifiedPackage, detector_settings
from inference.session import ModelError
from sync import Journal, Priority

log = logging.getLogger(__name__)


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
    watch: DetectorWatch | None = None
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
        self.records = ModelRecords(journal)
        self.store = store or ModelStore.from_config(cfg)
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
                await DetectorTrial(self, package, version).run()
            except Exception as exc:  # a bug here must not take the cameras down
                log.exception(
                    "canary failed unexpectedly",
                    extra={"fields": {"package": package.name, "version": version}},
                )
                body = {"name": package.name, "version": version, "cause": "internal"}
                reason = f"{type(exc).__name__}: {exc}"
                await self.records.write(Step("canary_failed", {**body, "reason": reason}))

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

    def _load_failed(self, key: str, exc: ModelError) -> None:
        """The pool could not open model `key`: during a watch of its package, a rollback."""
        package = self._package_of.get(key)
        if package is not None and package.watch is not None:
            package.watch.load_errors.append(f"{key}: {exc}")


# -- one staged version's trial ------------------------------------------------------------------


class DetectorTrial(ModelTrial):
    """One staged version of a package through the model-trial lifecycle (`trial.py`): its
    judge is agreement, latency and error rate against the active model on sampled frames; its
    swap point is every camera's `DetectorSlot`, between two frames."""

    def __init__(self, canaries: ModelCanaries, package: _Package, version: str) -> None:
        super().__init__(canaries.records)
        self.canaries = canaries
        self.settings = canaries.settings
        self.pool = canaries.pool
        self.store = canaries.store
        self.package = package
        self.name = package.name
        self.version = version
        self.base: dict[str, Any] = {"name": package.name, "version": version}
        self.run_: ShadowRun | None = None
        self.figures: dict[str, Any] = {}
        self.watch_: DetectorWatch | None = None
        self.rolled_back = False

    @property
    def watch_s(self) -> float:
        return self.settings.watch

    async def prepare(self) -> dict[str, Any]:
        name, version, package = self.name, self.version, self.package
        active, _ = await asyncio.to_thread(self.store.pointer, name)
        if version == active:
            raise TrialOver()
        self.base["previous"] = active
        if active is None:
            reason = (
                f"{name} has no active version to compare with; activate one by hand: "
                f"appliance models activate {name} VERSION"
            )
            package.last_canary = {"state": "failed", "version": version, "reason": reason}
            body = {**self.base, "cause": "no_active", "reason": reason}
            raise TrialOver(Step("canary_failed", body))
        refusal = await asyncio.to_thread(self.store.refusal, name, version)
        if refusal is not None:
            log.info(
                "refused model not tried again",
                extra={"fields": {"package": name, "version": version, "reason": refusal}},
            )
            raise TrialOver()
        try:
            verified = await asyncio.to_thread(self.store.resolve_version, name, version)
        except ModelError as exc:
            raise TrialOver(await self._refused(self.base, "unverifiable", str(exc))) from None
        if verified.manifest.task != "detector":
            log.info(
                "not a detector package; no canary",
                extra={"fields": {"package": name, "version": version}},
            )
            raise TrialOver()
        limits = Limits.resolve(verified.manifest.canary, self.settings)
        try:
            shadows = await self._open_shadows(verified)
        except UnknownClasses as exc:
            step = await self._refused(self.base, "labels", str(exc), limits=limits)
            raise TrialOver(step) from None
        except ModelError as exc:
            step = await self._refused(self.base, "load_error", str(exc), limits=limits)
            raise TrialOver(step) from None
        run = self.run_ = ShadowRun(name, version, active, shadows, limits, self.settings)
        return {
            "name": name,
            "version": version,
            "previous": active,
            "models": sorted(run.shadows),
            "limits": limits.as_dict(),
            "sample_every": self.settings.sample_every,
            "duration_s": self.settings.duration,
            "min_frames": self.settings.min_frames,
            "ends_at": run.ends_at,
        }

    async def _open_shadows(self, verified: VerifiedPackage) -> dict[str, OnnxDetector]:
        """One warm detector of the staged version per model key, configured as that key is;
        a model that does not know a class its cameras name is refused like a failed load."""
        cfg = self.canaries.cfg
        shadows: dict[str, OnnxDetector] = {}
        try:
            for key in self.package.keys:
                settings, labels = detector_settings(cfg.models[key], verified)
                detector = await asyncio.to_thread(
                    partial(OnnxDetector, settings, verified.model_path, key, labels=labels)
                )
                shadows[key] = detector
                for camera in cfg.cameras:
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

    async def shadow(self) -> dict[str, Any]:
        """Feed the shadow until it can be judged (or max_duration ran out), then judge it."""
        run, settings = self.run_, self.settings
        assert run is not None
        self.package.run = run
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
                    too_few = False
                    break
                if elapsed >= settings.max_duration:
                    too_few = True
                    break
        finally:
            for key in run.taps:
                self.pool.attach_shadow(key, None)
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            self.package.run = None
        figures = self.figures = run.figures(self.pool)
        failures = run.failures(self.pool, too_few=too_few)
        body = {**self.base, "metrics": figures, "limits": run.limits.as_dict()}
        if failures:
            reason = "; ".join(f["text"] for f in failures)
            step = await self._refused(body, failures[0]["metric"], reason, failed=failures)
            raise TrialOver(step)
        self.package.last_canary = {"state": "passed", "version": self.version, **figures}
        return body

    async def activate(self) -> dict[str, Any]:
        """Store pointer first, then every camera's detector in one step."""
        run = self.run_
        assert run is not None
        name, version, package = self.name, self.version, self.package
        base = {**self.base, "metrics": self.figures}
        active, _ = await asyncio.to_thread(self.store.pointer, name)
        if active != run.previous:
            # Someone activated another version meanwhile (`appliance models activate`): this
            # run compared against a model that is no longer the active one.
            package.last_canary = {"state": "superseded", "version": version, **self.figures}
            reason = f"the active version changed from {run.previous} to {active} during the canary"
            raise TrialOver(
                Step("canary_failed", {**base, "cause": "superseded", "reason": reason})
            )
        try:
            await asyncio.to_thread(self.store.activate, name, version)
        except ModelError as exc:
            raise TrialOver(await self._refused(base, "activation", str(exc))) from None
        budget_ratio = self.settings.latency_budget_ratio or run.limits.max_latency_ratio
        budget_ms: dict[str, float | None] = {}
        for key in run.shadows:
            current = self.pool.current(key)
            p95 = None if current is None else current.stats.p95_ms
            budget_ms[key] = None if p95 is None else p95 * budget_ratio
        # One step, no await: every camera of every key runs the new model from its next frame.
        handed, run.shadows = run.shadows, {}  # the pool owns them now
        retired = {key: self.pool.swap(key, detector) for key, detector in handed.items()}
        watch = self.watch_ = DetectorWatch(
            name=name,
            version=version,
            previous=run.previous,
            limits=run.limits,
            until_mono=time.monotonic() + self.settings.watch,
            until=utc_in(self.settings.watch),
            watched=handed,
            retired=retired,
            budget_ms=budget_ms,
        )
        for key, detector in watch.watched.items():
            stats = detector.stats
            watch.history[key] = deque([(stats.count + stats.errors, stats.errors)])
        log.info(
            "model activated by its canary",
            extra={"fields": {"package": name, "version": version, "previous": run.previous}},
        )
        return {
            **base,
            "watch_until": watch.until if self.settings.watch else None,
            "latency_budget_ms": {k: rounded(v, 3) for k, v in budget_ms.items()},
        }

    async def watch(self) -> tuple[str, str] | None:
        watch = self.watch_
        assert watch is not None
        self.package.watch = watch
        while time.monotonic() < watch.until_mono:
            await asyncio.sleep(min(CHECK_INTERVAL_S, watch.until_mono - time.monotonic()))
            problem = self._misbehaving(watch)
            if problem is not None:
                return problem
        return None

    def watch_ended(self) -> dict[str, Any]:
        watch = self.watch_
        assert watch is not None
        return {
            "name": watch.name,
            "version": watch.version,
            "previous": watch.previous,
            "metrics": watch.figures(),
        }

    def _misbehaving(self, watch: DetectorWatch) -> tuple[str, str] | None:
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

    async def roll_back(self, cause: str, detail: str) -> Step:
        """The previous version back: the store's pointer, then every camera in one step; the
        bad version refused."""
        watch = self.watch_
        assert watch is not None
        name, package = watch.name, self.package
        figures = watch.figures()
        base = {"name": name, "version": watch.version, "previous": watch.previous}
        try:
            await asyncio.to_thread(self.store.rollback, name)
        except ModelError as exc:
            package.last_watch = {"state": "rollback_failed", "version": watch.version}
            body = {**base, "cause": cause, "detail": detail, "error": str(exc), "metrics": figures}
            return Step("rollback_failed", body, Priority.ALERT)
        restore: dict[str, OnnxDetector] = {}
        not_restored: dict[str, str] = {}
        for key, old in watch.retired.items():
            if old is not None:
                restore[key] = old
                continue
            # No camera ran this key at activation: open the restored version now.
            try:
                restore[key] = await asyncio.to_thread(
                    open_detector, self.canaries.cfg.models[key], key, packages=self.store
                )
            except ModelError as exc:
                not_restored[key] = str(exc)
        # One step, no await: the cameras run the previous model from their next frame.
        replaced = [self.pool.swap(key, detector) for key, detector in restore.items()]
        for detector in replaced:
            if detector is not None:
                await detector.aclose()
        self.rolled_back = not not_restored
        reason = f"{cause}: {detail}"
        with contextlib.suppress(ModelError):
            await asyncio.to_thread(self.store.refuse, name, watch.version, reason)
        package.last_watch = {
            "state": "rolled_back",
            "version": watch.version,
            "cause": cause,
            "detail": detail,
        }
        log.warning(
            "model rolled back",
            extra={"fields": {"package": name, "version": watch.version, "cause": reason}},
        )
        body = {
            **base,
            "active": watch.previous,
            "cause": cause,
            "detail": detail,
            "metrics": figures,
            "not_restored": not_restored,
        }
        return Step("rolled_back", body, Priority.ALERT)

    def ended(self, last: Step | None) -> None:
        watch = self.watch_
        if watch is not None and last is not None and last.event in ("activated", "watch_ended"):
            # Watched to its end (or, with `watch: 0`, not at all).
            self.package.last_watch = {
                "state": "ended",
                "version": watch.version,
                **watch.figures(),
            }

    async def close(self) -> None:
        if self.run_ is not None:
            await self.run_.aclose()
        self.package.watch = None
        watch = self.watch_
        if watch is not None and not self.rolled_back:
            for detector in watch.retired.values():
                if detector is not None:
                    await detector.aclose()

    async def _refused(
        self,
        body: dict[str, Any],
        cause: str,
        reason: str,
        *,
        limits: Limits | None = None,
        failed: list[dict[str, Any]] | None = None,
    ) -> Step:
        """The version marked refused in the store; the `canary_failed` step that says why."""
        full = {**body, "cause": cause, "reason": reason}
        if limits is not None:
            full["limits"] = limits.as_dict()
        if failed is not None:
            full["failed"] = failed
        self.package.last_canary = {
            "state": "failed",
            "version": self.version,
            "cause": cause,
            "reason": reason,
            **(body.get("metrics") or {}),
        }
        try:
            await asyncio.to_thread(self.store.refuse, self.name, self.version, reason)
        except ModelError as exc:
            full["refuse_error"] = str(exc)
        log.warning(
            "staged model refused by its canary",
            extra={"fields": {"package": self.name, "version": self.version, "reason": reason}},
        )
        return Step("canary_failed", full)


__all__ = [
    "DetectorTrial",
    "ModelCanaries",
]
