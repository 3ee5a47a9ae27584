"""The daemon, and the composition root: journal, payload store, retention and scheduler in one
AsyncExitStack; one supervised pipeline task per source in one TaskGroup; a graceful, bounded stop
on SIGTERM/SIGINT with the journal flushed. `replay` is the same wiring over finite sources."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict
from typing import Any, Literal

from appliance.models.canary import ModelCanaries
from appliance.models.refit import CHECK_INTERVAL_S as REFIT_CHECK_S
from appliance.models.refit import BaselineRefits
from appliance.models.store import ModelStore
from appliance.models.updates import ModelUpdates
from appliance.runtime.control import ControlServer
from appliance.runtime.scheduler import Jobs
from appliance.runtime.supervisor import ComponentHealth, Supervised
from appliance.stages.pipeline import SourcePipeline
from appliance.stages.recorder import Recorder
from appliance.stages.vision import CameraPipeline, DetectorPool, quiet_opencv
from appliance.status.alarms import AlarmBoard
from appliance.status.health import HEARTBEAT_INTERVAL_S, HealthMonitor, app_version
from appliance.status.web import StatusServer, read_status_token
from config import ApplianceConfig, Camera, ConfigError, LiveSensorCommon, SimulatedSensor
from sensors import SensorConfig, open_source
from sensors.camera import CameraSource
from sensors.capture import parse_camera_url
from sensors.nmea import NmeaSource, Position
from sync import (
    Journal,
    NewRecord,
    PayloadStore,
    Priority,
    StorageFull,
    StorageGuard,
    TelemetryRollup,
)
from sync.engine import SyncEngine
from sync.targets import make_target

log = logging.getLogger(__name__)

Mode = Literal["run", "replay"]


def check_replayable(cfg: ApplianceConfig) -> None:
    """`replay` runs sources to their end, so every source must have one."""
    if not cfg.sensors and not cfg.cameras:
        raise ConfigError(
            "replay needs at least one source under `sensors:` or `cameras:`",
            key="sensors",
            line=None,
        )
    for index, camera in enumerate(cfg.cameras):
        try:
            kind = parse_camera_url(camera.url)[0]
        except ValueError as exc:
            raise ConfigError(str(exc), key=f"cameras[{index}].url", line=None) from None
        if kind != "file":
            raise ConfigError(
                f"camera {camera.name!r} is a live camera; replay needs video files",
                key=f"cameras[{index}].url",
                line=None,
            )
        if camera.loop:
            raise ConfigError(
                f"camera {camera.name!r} loops forever; set `loop: false` for replay",
                key=f"cameras[{index}].loop",
                line=None,
            )
    for index, sensor in enumerate(cfg.sensors):
        if isinstance(sensor, SimulatedSensor) and sensor.duration is None:
            raise ConfigError(
                f"source {sensor.name!r} never ends; set `duration` for replay",
                key=f"sensors[{index}].duration",
                line=None,
            )
        if isinstance(sensor, LiveSensorCommon):
            raise ConfigError(
                f"source {sensor.name!r} is a live {sensor.type} source; replay needs recorded "
                "data (a csv source, or a simulated one with `duration`)",
                key=f"sensors[{index}].type",
                line=None,
            )


def _waker(engine: SyncEngine) -> Callable[[], Awaitable[None]]:
    async def wake() -> None:
        engine.wake.set()

    return wake


class PositionBoard:
    """The appliance's last known position, from whichever NMEA source has the newest fix; the
    journal stamps it on every record (a ship's records say where they were taken)."""

    def __init__(self) -> None:
        self.sources: dict[str, NmeaSource] = {}
        self._shown: tuple[Position, dict[str, Any]] | None = None

    def latest(self) -> dict[str, Any] | None:
        fixes = [s.last_position for s in self.sources.values() if s.last_position is not None]
        if not fixes:
            return None
        newest = max(fixes, key=lambda p: p.received)
        if self._shown is None or self._shown[0] is not newest:
            self._shown = (newest, newest.as_dict())  # one dict per fix, not one per record
        return self._shown[1]


class Daemon:
    """One run of the appliance. `await Daemon(cfg).run()` returns the process exit code."""

    def __init__(
        self, cfg: ApplianceConfig, *, mode: Mode = "run", stop: asyncio.Event | None = None
    ) -> None:
        self.cfg = cfg
        self.mode = mode
        self.stop = stop or asyncio.Event()
        self.pipelines: dict[str, SourcePipeline] = {}
        self.cameras: dict[str, CameraPipeline] = {}
        self.positions = PositionBoard()
        self.monitor: HealthMonitor | None = None
        # The active alarms: the stages hand it their records, the monitor the live state.
        self.alarms = AlarmBoard()
        self.engines: list[SyncEngine] = []
        self.model_updates: ModelUpdates | None = None
        self.canaries: ModelCanaries | None = None
        self.status_server: StatusServer | None = None
        self._signals = 0
        self._stop_reason = "requested"
        self._status_token: str | None = None

    def _on_signal(self, signame: str) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping", extra={"fields": {"signal": signame}})
            self._stop_reason = signame
            self.stop.set()
        else:
            # Everything already reported durable is on disk; only queued, unreported records go.
            log.warning("second signal: exiting at once", extra={"fields": {"signal": signame}})
            os._exit(130)

    async def run(self) -> int:
        if self.mode == "replay":
            check_replayable(self.cfg)
        if self.mode == "run" and self.cfg.status.enabled:
            # Checked before anything opens: a page open to the network needs a token.
            self._status_token = read_status_token(self.cfg.status)
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig.name)
                installed.append(sig)
        started = time.monotonic()
        try:
            code = await self._run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        log.info(
            "stopped cleanly",
            extra={
                "fields": {
                    "reason": self._stop_reason,
                    "exit_code": code,
                    "seconds": round(time.monotonic() - started, 2),
                }
            },
        )
        return code

    async def _run(self) -> int:
        cfg = self.cfg
        data_dir = cfg.appliance.data_dir
        async with AsyncExitStack() as stack:
            store = await asyncio.to_thread(PayloadStore, data_dir / "payloads")
            journal = await Journal.open(
                data_dir, appliance_id=cfg.appliance.id, settings=cfg.journal, payloads=store
            )
            stack.push_async_callback(journal.close)
            store.on_disk_full = journal.notify_disk_full
            guard = await stack.enter_async_context(
                StorageGuard(
                    journal,
                    store,
                    cfg.storage,
                    TelemetryRollup(journal, cfg.storage, cfg.sync.batch_records),
                )
            )
            if cfg.cameras:
                quiet_opencv()
            model_store = ModelStore.from_config(cfg)
            detectors = DetectorPool(cfg, model_store)
            stack.push_async_callback(detectors.aclose)
            monitor = self.monitor = HealthMonitor(
                journal,
                guard,
                mode=self.mode,
                camera_names=[c.name for c in cfg.cameras],
                alarms=self.alarms,
            )
            engines: list[SyncEngine] = []
            if self.mode == "run":  # replay is backtesting: it journals, it does not ship
                for dest in cfg.sync.destinations:
                    target = await stack.enter_async_context(
                        make_target(dest, cfg.appliance.id, data_dir, cfg.sync.chunk_size)
                    )
                    engine = SyncEngine(journal, store, target, dest, cfg.sync)
                    engines.append(engine)
                    monitor.destinations[dest.name] = engine.state
            self.engines = engines
            refits = BaselineRefits(cfg, journal, self.pipelines)  # replay: none is started
            if self.mode == "run":
                await stack.enter_async_context(refits)
                monitor.refits.update(refits.describers())
                await stack.enter_async_context(ControlServer(data_dir, engines, refits.start))
                self.model_updates = ModelUpdates.for_daemon(cfg, journal, engines)
            if self.model_updates is not None:
                monitor.models = self.model_updates.describe
                await stack.enter_async_context(self.model_updates)
            if self.mode == "run":  # replay backtests: it never changes the active models
                canaries = ModelCanaries(cfg, detectors, journal, store=model_store)
                self.canaries = await stack.enter_async_context(canaries)
                monitor.canaries.update(canaries.describers())
                if self.model_updates is not None:
                    self.model_updates.subscribe(canaries.staged)
            if self.mode == "run" and cfg.status.enabled:
                # Its loops run under the supervisor with the shippers (`_run_sources`).
                server = StatusServer(
                    cfg, journal, store, monitor, engines, token=self._status_token, supervised=True
                )
                self.status_server = await stack.enter_async_context(server)
            jobs = Jobs()
            jobs.every("retention", cfg.storage.check_interval, guard.run_once, run_now=True)
            jobs.every("checkpoint", cfg.journal.checkpoint_interval, journal.checkpoint)
            jobs.every("health", cfg.appliance.health_interval, monitor.record, run_now=True)
            jobs.every("heartbeat", HEARTBEAT_INTERVAL_S, monitor.heartbeat, run_now=True)
            if self.mode == "run" and refits.refits:
                jobs.every("refit", REFIT_CHECK_S, refits.tick)
            for engine in engines:
                # The interval drain; the engine's own probe starts one at once when a link returns.
                engine.scheduled = True
                jobs.every(f"sync:{engine.name}", cfg.sync.interval, _waker(engine))
            await stack.enter_async_context(jobs)
            stack.push_async_callback(monitor.heartbeat, state="stopped")
            await self._lifecycle(journal, "started")
            # After the first record, never before it: an unclean stop's full check reads the
            # whole file in a niced child process while sources journal. Stopped before the
            # last heartbeat, so that says it did not finish (the next start runs it again).
            journal.start_integrity_check()
            stack.push_async_callback(journal.stop_integrity_check)
            log.info(
                "started",
                extra={
                    "fields": {
                        "appliance": cfg.appliance.id,
                        "data_dir": str(data_dir),
                        "mode": self.mode,
                        "sources": [s.name for s in [*cfg.sensors, *cfg.cameras]],
                        "boot_id": journal.boot_id,
                        "version": app_version(),
                    }
                },
            )
            code = await self._run_sources(journal, store, monitor, engines, detectors)
            # The interval jobs end first: a `health` run in flight must not land after `stopped`.
            await jobs.stop()
            await monitor.record()
            await self._lifecycle(journal, "stopped", reason=self._stop_reason)
            if engines:
                # One last bounded try to ship what is waiting, the stop record included.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(cfg.appliance.shutdown_timeout / 2):
                        await asyncio.gather(*(e.final_attempt() for e in engines))
        return code

    async def _lifecycle(self, journal: Journal, event: str, **extra: Any) -> None:
        body = {
            "event": event,
            "mode": self.mode,
            "version": app_version(),
            "pid": os.getpid(),
            **extra,
        }
        with contextlib.suppress(StorageFull):
            await journal.append(
                NewRecord(source="appliance", kind="lifecycle", priority=Priority.EVENT, body=body),
                force=True,
            )

    async def _run_sources(
        self,
        journal: Journal,
        store: PayloadStore,
        monitor: HealthMonitor,
        engines: list[SyncEngine],
        detectors: DetectorPool,
    ) -> int:
        cfg = self.cfg

        async def component_event(event: str, health: ComponentHealth) -> None:
            with contextlib.suppress(StorageFull):
                await journal.append(
                    NewRecord(
                        source="appliance",
                        kind="component",
                        priority=Priority.EVENT,
                        body={"component": health.name, "event": event, **asdict(health)},
                    )
                )

        def attempt_factory(sensor: SensorConfig) -> Any:
            async def attempt() -> None:
                source = open_source(sensor, appliance_id=cfg.appliance.id)
                monitor.sources[sensor.name] = source.health
                if isinstance(source, NmeaSource) and source.cfg.position:
                    self.positions.sources[sensor.name] = source
                    journal.position_source = self.positions.latest
                previous = self.pipelines.get(sensor.name)  # this source's run before a restart
                pipeline = SourcePipeline(
                    sensor,
                    source,
                    journal,
                    store,
                    replay=self.mode == "replay",
                    watch=self.alarms.observe,
                    violated=() if previous is None else previous.violated,
                )
                self.pipelines[sensor.name] = pipeline
                if pipeline.anomaly is not None:
                    monitor.anomalies[sensor.name] = pipeline.anomaly.describe
                monitor.drift[sensor.name] = pipeline.drift_status
                await pipeline.run()

            return attempt

        def camera_attempt(camera: Camera) -> Any:
            if self.mode == "replay":  # backtesting: as fast as the detector goes, every frame
                camera = camera.model_copy(update={"pace": "fast"})

            async def attempt() -> None:
                source = CameraSource(camera)
                monitor.sources[camera.name] = source.health
                slot = await detectors.slot(camera.model)
                pipeline = CameraPipeline(
                    camera,
                    source,
                    slot.detector,
                    Recorder(camera.name, journal, store, watch=self.alarms.observe),
                    scratch_dir=store.tmp,
                )
                pipeline.follow(slot)  # canary activations and rollbacks swap its detector
                self.cameras[camera.name] = pipeline
                monitor.cameras[camera.name] = pipeline.health
                await pipeline.run()

            return attempt

        supervised = [
            Supervised(
                f"source:{sensor.name}",
                attempt_factory(sensor),
                budget=cfg.appliance.restart_budget,
                window_s=cfg.appliance.restart_window,
                on_event=component_event,
            )
            for sensor in cfg.sensors
        ] + [
            Supervised(
                f"camera:{camera.name}",
                camera_attempt(camera),
                budget=cfg.appliance.restart_budget,
                window_s=cfg.appliance.restart_window,
                on_event=component_event,
            )
            for camera in cfg.cameras
        ]
        shippers = [
            Supervised(
                f"sync:{engine.name}",
                engine.run,
                budget=cfg.appliance.restart_budget,
                window_s=cfg.appliance.restart_window,
                on_event=component_event,
            )
            for engine in engines
        ]
        if self.model_updates is not None:
            shippers.append(
                Supervised(
                    "models",
                    self.model_updates.run,
                    budget=cfg.appliance.restart_budget,
                    window_s=cfg.appliance.restart_window,
                    on_event=component_event,
                )
            )
        if self.status_server is not None:
            shippers += [
                Supervised(
                    name,
                    loop,
                    budget=cfg.appliance.restart_budget,
                    window_s=cfg.appliance.restart_window,
                    on_event=component_event,
                )
                for name, loop in self.status_server.housekeeping().items()
            ]
        for component in [*supervised, *shippers]:
            monitor.components[component.name] = component.health
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(s.run(), name=s.name) for s in supervised]
            shipping = [group.create_task(s.run(), name=s.name) for s in shippers]
            waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.stop.wait())]
            if self.mode == "replay":
                waiters.append(
                    asyncio.ensure_future(asyncio.wait(tasks))
                    if tasks
                    else asyncio.ensure_future(asyncio.sleep(0))
                )
                self._stop_reason = "replay_done"
            _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
            if self.stop.is_set() and self.mode == "replay":
                self._stop_reason = "interrupted"
            for task in tasks:
                task.cancel()
            _, late = (
                await asyncio.wait(tasks, timeout=cfg.appliance.shutdown_timeout)
                if tasks
                else (set(), set())
            )
            if late:
                log.error(
                    "components did not stop in time",
                    extra={"fields": {"late": [t.get_name() for t in late]}},
                )
            for task in shipping:
                task.cancel()
            if shipping:
                await asyncio.wait(shipping)
        degraded = [c.name for c in supervised if c.health.state == "degraded"]
        if self.mode == "replay" and (degraded or self._stop_reason == "interrupted"):
            return 1
        return 0
