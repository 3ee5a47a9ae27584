"""Owns the one lifecycle a new model version goes through on the device, and the `model` records
it leaves: prepare the candidate -> try it in shadow and judge it by limits -> activate it
atomically between two units of work -> watch it -> roll it back by itself.

Two callers run it: the detector canary (`canary.py`: staged `package:NAME` detectors, judged by
agreement, latency and error rate, swapped between two frames) and the baseline refit
(`refit.py`: a refitted anomaly baseline, judged by its alarm share, swapped between two
windows). Each keeps its own judge and its own swap point; the order of the steps, which record
each step leaves, and how a trial ends are here, once.

A phase that ends the trial early (a refused candidate, a superseded run, a failed activation)
raises `TrialOver` with the record to leave (or none, for a candidate that is quietly not tried).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sync import Journal, NewRecord, Priority, StorageFull

log = logging.getLogger(__name__)

RECORD_SOURCE = "models"
"""The source of every `model` record: pulls, canaries, activations, watches, rollbacks, refits."""
RECORD_KIND = "model"


@dataclass(frozen=True)
class Step:
    """One `model` record: `event` (canary_started, activated, rolled_back, ...) and its body."""

    event: str
    body: dict[str, Any]
    priority: Priority = Priority.EVENT


class TrialOver(Exception):
    """Raised by a phase: the trial ends here, leaving `step` in the journal (None: quietly)."""

    def __init__(self, step: Step | None = None) -> None:
        super().__init__(step.event if step is not None else "ended quietly")
        self.step = step


class ModelRecords:
    """The one writer of `model` records. `fields` go into every body (a refit's source and
    model); `model` names the record's model as `model@version` when the body has a version.
    A full disk drops the record with a warning: the lifecycle goes on."""

    def __init__(
        self, journal: Journal, *, fields: Mapping[str, Any] | None = None, model: str | None = None
    ) -> None:
        self.journal = journal
        self.fields = dict(fields or {})
        self.model = model

    async def write(self, step: Step) -> None:
        version = step.body.get("version")
        body = {"event": step.event, **self.fields, **step.body}
        try:
            await self.journal.append(
                NewRecord(
                    source=RECORD_SOURCE,
                    kind=RECORD_KIND,
                    priority=step.priority,
                    body=body,
                    model=f"{self.model}@{version}" if self.model and version else None,
                )
            )
        except StorageFull:
            log.warning(
                "model record not journalled: storage full",
                extra={"fields": {"event": step.event, "model": self.model or body.get("name")}},
            )


class ModelTrial(ABC):
    """One candidate version through the lifecycle. `run` calls the phases in order and writes
    the record each leaves; a subclass gives the phases (its judge, its swap point) and the
    bodies of its records. `phase` says where the trial is, for the status page."""

    def __init__(self, records: ModelRecords) -> None:
        self.records = records
        self.phase = "preparing"

    async def run(self) -> Step | None:
        """The trial from preparation to its end; the last record it left (None: none)."""
        last: Step | None
        try:
            try:
                started = await self.prepare()
                self.phase = "canary"
                await self.records.write(Step("canary_started", started))
                passed = await self.shadow()
                await self.records.write(Step("canary_passed", passed))
                self.phase = "activating"
                activated = await self.activate()
                last = Step("activated", activated)
                await self.records.write(last)
                if self.watch_s > 0:
                    self.phase = "watching"
                    tripped = await self.watch()
                    if tripped is None:
                        last = Step("watch_ended", self.watch_ended())
                    else:
                        self.phase = "rolling_back"
                        last = await self.roll_back(*tripped)
                    await self.records.write(last)
            except TrialOver as over:
                last = over.step
                if last is not None:
                    await self.records.write(last)
            self.ended(last)
            return last
        finally:
            await self.close()

    @property
    @abstractmethod
    def watch_s(self) -> float:
        """How long an activated candidate is watched (0: not at all)."""

    @abstractmethod
    async def prepare(self) -> dict[str, Any]:
        """Stage the candidate (verify, fit, load, open it); the `canary_started` body."""

    @abstractmethod
    async def shadow(self) -> dict[str, Any]:
        """Run the candidate in shadow until it can be judged, and judge it by the limits;
        the `canary_passed` body, or `TrialOver` with the `canary_failed` step."""

    @abstractmethod
    async def activate(self) -> dict[str, Any]:
        """Make the candidate current: the store's pointer first, then the running stages,
        between two units of work; the `activated` body."""

    @abstractmethod
    async def watch(self) -> tuple[str, str] | None:
        """Watch the activated candidate for `watch_s`; (cause, detail) when it must go."""

    @abstractmethod
    def watch_ended(self) -> dict[str, Any]:
        """The `watch_ended` body: the candidate behaved."""

    @abstractmethod
    async def roll_back(self, cause: str, detail: str) -> Step:
        """The previous version back, in the store and in the running stages: the
        `rolled_back` step, or `rollback_failed` when the store could not."""

    @abstractmethod
    def ended(self, last: Step | None) -> None:
        """Told how the trial ended (for what the status page shows next); after the record."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the trial still holds (shadow detectors, retired models)."""


__all__ = ["RECORD_KIND", "RECORD_SOURCE", "ModelRecords", "ModelTrial", "Step", "TrialOver"]
