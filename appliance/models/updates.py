"""Owns pulling, verifying and staging model packages in the running daemon: every
`model_packages.pull_interval` and right after each drain of a destination with `models: true`,
list what it offers this appliance, download what is new (sync/model_pull.py), import it into the
model store (appliance/models/store.py: signature, hashes and addressing checked), journal a
`model` record for each package staged or refused, and tell listeners (the canary) what was
staged. Nothing here activates a model.

Files under DATA_DIR/models/:

    incoming/SHA256.part    downloads in progress (resumed after a cut or a restart)
    incoming/SHA256.tar     complete downloads waiting for their import
    rejected/SHA256.tar     the last refused packages (5 kept), for a look at what was sent
    pulled.json             what became of each package sha256: staged or refused (never
                            fetched again), or how often its download did not match its sha256
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.models.store import ModelStore, StoreError
from appliance.models.trial import ModelRecords, Step
from config import ApplianceConfig
from config.shipping import HttpDestination, S3Destination
from config.units import in_windows
from inference.package_manifest import PackageError
from sync import Journal
from sync.destination import DestinationError, RateLimiter
from sync.engine import SyncEngine
from sync.model_pull import (
    INCOMING_DIR,
    ModelSource,
    OfferedPackage,
    PullError,
    download,
    make_model_source,
)
from sync.payloads import fsync_dir
from sync.records import format_ts

log = logging.getLogger(__name__)

LEDGER = "pulled.json"
REJECTED_DIR = "rejected"
KEEP_REJECTED = 5
# A download that does not hash to its listed sha256 is fetched again from zero (a power cut can
# leave a damaged part) up to this many times; then the package is refused for good.
MAX_MISMATCHES = 3
# How often the loop looks whether a sync engine finished a drain (a field read, nothing more).
_DRAIN_CHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class StagedPackage:
    """A package that passed every check and is installed as staged (not active)."""

    name: str
    version: str
    sha256: str
    model_sha256: str
    source: str
    directory: Path


StagedListener = Callable[[StagedPackage], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Feed:
    """One destination with `models: true`: where to pull from, the link's bandwidth cap and
    time windows (shared with its sync engine), and when that engine last finished a drain."""

    source: ModelSource
    limiter: RateLimiter
    windows: list[str]
    last_drain: Callable[[], str | None]


@dataclass
class PullRound:
    """What one pull did."""

    staged: list[StagedPackage] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # True when every feed that was reachable listed its packages and every download finished.
    complete: bool = True


@dataclass
class ModelsHealth:
    """What status shows under `models`."""

    sources: list[str]
    last_pull: str | None = None
    last_error: str | None = None
    staged: int = 0
    refused: int = 0
    last_staged: str | None = None
    last_refused: str | None = None
    downloading: str | None = None
    bytes_fetched: int = 0
    consecutive_failures: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "last_pull": self.last_pull,
            "last_error": self.last_error,
            "staged": self.staged,
            "refused": self.refused,
            "last_staged": self.last_staged,
            "last_refused": self.last_refused,
            "downloading": self.downloading,
            "bytes_fetched": self.bytes_fetched,
            "consecutive_failures": self.consecutive_failures,
        }


def _now() -> str:
    return format_ts(datetime.now(UTC))


class Ledger:
    """pulled.json: sha256 -> what became of that package. Rewritten whole (tmp, fsync, rename)
    after each change: it holds one small entry per package ever offered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}

    def load(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Losing it costs a download of packages already handled, which the store then
            # recognises as installed (or refuses again): never a wrong model.
            log.warning(
                "model pull ledger unreadable; starting afresh",
                extra={"fields": {"path": str(self.path), "error": str(exc)}},
            )
            return
        if isinstance(doc, dict):
            self.entries = {k: v for k, v in doc.items() if isinstance(v, dict)}

    def done(self, sha256: str) -> bool:
        """Staged or refused: never fetched again."""
        return self.entries.get(sha256, {}).get("state") in ("staged", "refused")

    def mismatches(self, sha256: str) -> int:
        return int(self.entries.get(sha256, {}).get("mismatches", 0))

    def save(self, sha256: str, entry: dict[str, Any]) -> None:
        self.entries[sha256] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        with partial.open("w", encoding="utf-8") as handle:
            json.dump(self.entries, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(self.path)
        fsync_dir(self.path.parent)


def _last_drain(engine: SyncEngine) -> Callable[[], str | None]:
    def last_drain() -> str | None:
        return engine.state.last_success

    return last_drain


class ModelUpdates:
    """Pulls model packages from its feeds into the store. An async context manager (it enters
    its sources); `run()` is the daemon's loop, `pull_once()` one round."""

    def __init__(
        self,
        store: ModelStore,
        journal: Journal,
        feeds: Sequence[Feed],
        *,
        models_dir: Path,
        pull_interval: float,
        retry_max: float,
        min_free: int = 0,
    ) -> None:
        self.store = store
        self.journal = journal
        self.records = ModelRecords(journal)
        self.feeds = list(feeds)
        self.incoming = models_dir / INCOMING_DIR
        self.rejected = models_dir / REJECTED_DIR
        self.ledger = Ledger(models_dir / LEDGER)
        self.pull_interval = pull_interval
        self.retry_max = retry_max
        self.min_free = min_free
        self.health = ModelsHealth(sources=[feed.source.name for feed in self.feeds])
        self.wake = asyncio.Event()
        self._listeners: list[StagedListener] = []
        self._stack = AsyncExitStack()
        self._lock = asyncio.Lock()

    @classmethod
    def for_daemon(
        cls, cfg: ApplianceConfig, journal: Journal, engines: Sequence[SyncEngine]
    ) -> ModelUpdates | None:
        """Feeds for the engines whose destination has `models: true`; None when there is none."""
        group = cfg.model_packages.group
        feeds = []
        for engine in engines:
            dest = engine.cfg
            if isinstance(dest, HttpDestination | S3Destination) and dest.models:
                source = make_model_source(dest, cfg.appliance.id, group)
                feeds.append(Feed(source, engine.limiter, dest.windows, _last_drain(engine)))
        if not feeds:
            return None
        return cls(
            ModelStore.from_config(cfg),
            journal,
            feeds,
            models_dir=cfg.appliance.data_dir / "models",
            pull_interval=cfg.model_packages.pull_interval,
            retry_max=cfg.sync.retry_max,
            min_free=cfg.storage.min_free,
        )

    def subscribe(self, listener: StagedListener) -> None:
        """Call `listener` (awaited, in the pull loop) for each package staged from now on."""
        self._listeners.append(listener)

    def describe(self) -> dict[str, Any]:
        return self.health.to_dict()

    async def __aenter__(self) -> ModelUpdates:
        try:
            for feed in self.feeds:
                await self._stack.enter_async_context(feed.source)
            await asyncio.to_thread(self._prepare)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def _prepare(self) -> None:
        self.ledger.load()
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():
            sha256 = leftover.name.partition(".")[0]
            if self.ledger.done(sha256) or leftover.suffix not in (".part", ".tar"):
                leftover.unlink(missing_ok=True)

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Pull at once, then every pull_interval, right after a drain and on `wake`; after a
        failed round sooner, with a jittered backoff capped at sync.retry_max."""
        delay = 0.0
        while True:
            await self._wait(delay)
            result = await self.pull_once()
            if result.complete:
                self.health.consecutive_failures = 0
                delay = self.pull_interval
            else:
                self.health.consecutive_failures += 1
                backoff = 2.0 ** min(self.health.consecutive_failures, 16)
                delay = min(self.retry_max, self.pull_interval, backoff)
                delay *= random.uniform(0.5, 1.0)

    def _drains(self) -> tuple[str | None, ...]:
        return tuple(feed.last_drain() for feed in self.feeds)

    async def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        drains = self._drains()
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=min(left, _DRAIN_CHECK_S))
            if self.wake.is_set() or self._drains() != drains:
                break
        self.wake.clear()

    # -- one round ------------------------------------------------------------------------------

    async def pull_once(self) -> PullRound:
        """List every feed, fetch and import what is new. Never raises for what upstream does:
        errors end up in the round, in health and in the log."""
        async with self._lock:
            result = PullRound()
            if len(self.store.trusted) == 0:
                message = (
                    "model_packages.trusted_keys is empty: no package could be accepted, so none "
                    "is fetched"
                )
                self.health.last_error = message
                result.errors.append(message)
                return result
            offered: set[str] = set()
            handled: set[str] = set()  # several feeds may offer the same package
            listed = [await self._pull_feed(feed, result, offered, handled) for feed in self.feeds]
            if all(listed):
                await asyncio.to_thread(self._forget_unoffered, offered)
            if any(listed):
                self.health.last_pull = _now()
            if not result.errors:
                self.health.last_error = None
            return result

    async def _pull_feed(
        self, feed: Feed, result: PullRound, offered: set[str], handled: set[str]
    ) -> bool:
        """One feed's round; whether it was listed (False: not reachable, outside its windows,
        or the listing failed)."""
        source = feed.source
        if not in_windows(feed.windows, datetime.now(UTC)):
            return False
        try:
            if not await source.reachable():
                # Not a failure: the engine's drain when the link returns starts a round.
                self._failed(result, f"model source {source.name!r}: not reachable", complete=True)
                return False
            packages = await source.offered()
        except PullError as exc:
            self._failed(result, str(exc))
            return False
        except DestinationError as exc:  # the probe's permanent errors (TLS, a 4xx)
            self._failed(result, str(exc))
            return False
        for package in packages:
            offered.add(package.sha256)
            if self.ledger.done(package.sha256) or package.sha256 in handled:
                continue
            handled.add(package.sha256)
            if not await self._fetch_and_import(feed, package, result):
                break  # the link failed: the rest waits for the next round
        return True

    def _failed(self, result: PullRound, message: str, *, complete: bool = False) -> None:
        result.errors.append(message)
        result.complete = result.complete and complete
        self.health.last_error = message
        log.warning("model pull failed", extra={"fields": {"error": message}})

    async def _fetch_and_import(
        self, feed: Feed, package: OfferedPackage, result: PullRound
    ) -> bool:
        """Download and import one package; False to stop this feed for the round."""
        self.health.downloading = package.label
        try:
            fetched = await download(
                feed.source, package, self.incoming, feed.limiter, min_free=self.min_free
            )
        except PullError as exc:
            if exc.cause == "sha_mismatch":
                await self._mismatch(package, exc, result)
                return True
            if exc.cause == "gone":
                log.info("model package withdrawn", extra={"fields": {"error": str(exc)}})
                return True
            # The link failed or the upstream refuses us: the rest of this feed would fare alike.
            self._failed(result, str(exc))
            return False
        finally:
            self.health.downloading = None
        self.health.bytes_fetched += fetched.fetched
        return await self._import(package, fetched.path, result)

    async def _import(self, package: OfferedPackage, path: Path, result: PullRound) -> bool:
        try:
            verified, events = await asyncio.to_thread(self.store.import_package, path)
        except PackageError as exc:
            await self._refuse(package, exc.cause, str(exc), result, path=path)
            return True
        except StoreError as exc:
            await self._refuse(package, "store", str(exc), result, path=path)
            return True
        except OSError as exc:  # disk full while installing: keep the download, try later
            self._failed(result, f"{package.label}: import failed ({exc.strerror or exc})")
            return True
        manifest = verified.manifest
        staged = StagedPackage(
            name=manifest.name,
            version=manifest.version,
            sha256=package.sha256,
            model_sha256=verified.model_sha256,
            source=package.source,
            directory=verified.directory,
        )
        await asyncio.to_thread(
            self.ledger.save,
            package.sha256,
            {
                "state": "staged",
                "name": manifest.name,
                "version": manifest.version,
                "source": package.source,
                "at": _now(),
            },
        )
        await asyncio.to_thread(path.unlink, missing_ok=True)
        result.staged.append(staged)
        self.health.staged += 1
        self.health.last_staged = f"{manifest.name} {manifest.version}"
        pruned = [f"{e.name} {e.version}" for e in events if e.action == "prune"]
        await self._journal(
            {
                "event": "staged",
                "name": manifest.name,
                "version": manifest.version,
                "sha256": package.sha256,
                "model_sha256": verified.model_sha256,
                "signed_by": verified.signer.describe(),
                "source": package.source,
                "new": bool(events),
                "pruned": pruned,
            }
        )
        log.info(
            "model package staged",
            extra={"fields": {"package": staged.name, "version": staged.version}},
        )
        for listener in self._listeners:
            try:
                await listener(staged)
            except Exception:  # a listener's bug must not stop the pulls
                log.exception("model staged listener failed")
        return True

    async def _mismatch(self, package: OfferedPackage, exc: PullError, result: PullRound) -> None:
        mismatches = self.ledger.mismatches(package.sha256) + 1
        final = mismatches >= MAX_MISMATCHES
        entry = {"state": "refused" if final else "mismatch", "mismatches": mismatches}
        entry.update({"cause": "sha_mismatch", "source": package.source, "at": _now()})
        await asyncio.to_thread(self.ledger.save, package.sha256, entry)
        then = "gave up on it" if final else f"fetching it again ({mismatches} of {MAX_MISMATCHES})"
        await self._refuse(package, "sha_mismatch", f"{exc}; {then}", result, will_retry=not final)

    async def _refuse(
        self,
        package: OfferedPackage,
        cause: str,
        message: str,
        result: PullRound,
        *,
        path: Path | None = None,
        will_retry: bool = False,
    ) -> None:
        kept = None
        if path is not None:
            kept = await asyncio.to_thread(self._keep_rejected, path, package.sha256)
            await asyncio.to_thread(
                self.ledger.save,
                package.sha256,
                {"state": "refused", "cause": cause, "source": package.source, "at": _now()},
            )
        body = {
            "event": "refused",
            "cause": cause,
            "message": message,
            "sha256": package.sha256,
            "source": package.source,
            # What the listing claimed: nothing of a refused package is verified.
            "listed_as": None if package.name is None else f"{package.name} {package.version}",
            "kept": None if kept is None else str(kept),
            "will_retry": will_retry,
        }
        result.refused.append(body)
        self.health.refused += 1
        self.health.last_refused = f"{package.label}: {cause}"
        await self._journal(body)
        log.warning(
            "model package refused",
            extra={"fields": {"cause": cause, "error": message, "sha256": package.sha256}},
        )

    def _keep_rejected(self, path: Path, sha256: str) -> Path:
        """Move a refused package to rejected/, keeping only the newest KEEP_REJECTED there."""
        self.rejected.mkdir(parents=True, exist_ok=True)
        kept = self.rejected / f"{sha256}.tar"
        shutil.move(path, kept)
        os.utime(kept)  # newest by mtime, whatever the download's own time was
        files = sorted(self.rejected.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[KEEP_REJECTED:]:
            old.unlink(missing_ok=True)
        return kept

    def _forget_unoffered(self, offered: set[str]) -> None:
        """Drop downloads of packages no feed offers any more (all feeds listed this round)."""
        for leftover in self.incoming.iterdir():
            if leftover.name.partition(".")[0] not in offered:
                leftover.unlink(missing_ok=True)

    async def _journal(self, body: dict[str, Any]) -> None:
        await self.records.write(Step(str(body["event"]), body))


__all__ = [
    "KEEP_REJECTED",
    "LEDGER",
    "MAX_MISMATCHES",
    "Feed",
    "ModelUpdates",
    "PullRound",
    "StagedListener",
    "StagedPackage",
]
