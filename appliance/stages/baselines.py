"""Where fitted anomaly baselines live on the device: one file per version under
`<data_dir>/models/baselines/<source>/`, and a `current` file naming the one in use and the one
before it, so a restart scores with the same baseline instead of fitting a new one and a refit
(appliance/models/refit.py) can roll back."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from inference.baseline import Baseline, BaselineError
from sync.payloads import fsync_dir

log = logging.getLogger(__name__)

CURRENT = "current.json"


class BaselineStore:
    """Saves baselines atomically (a power cut leaves the old one or the new one, never half of
    either) and loads the current one per source."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> BaselineStore:
        return cls(data_dir / "models" / "baselines")

    def folder(self, source: str) -> Path:
        return self.root / source

    def save(self, source: str, baseline: Baseline, *, make_current: bool = True) -> Path:
        """Write `baseline` as `<version>.npz`; with `make_current`, scoring uses it from now on
        (the one it replaces becomes `previous`). Without, it waits on disk (a refit's
        candidate)."""
        folder = self.folder(source)
        folder.mkdir(parents=True, exist_ok=True)
        path = self.path_of(source, baseline.version)
        partial = folder / f".{baseline.version}.npz.partial"
        baseline.save(partial)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        partial.replace(path)
        if make_current:
            self._make_current(source, baseline.version)
        fsync_dir(folder)
        return path

    def path_of(self, source: str, version: str) -> Path:
        return self.folder(source) / f"{version}.npz"

    def activate(self, source: str, version: str) -> str | None:
        """Make the saved `version` current; the version it replaced (now `previous`)."""
        if not self.path_of(source, version).is_file():
            raise BaselineError(self.path_of(source, version), "no such baseline version saved")
        previous = self._make_current(source, version)
        fsync_dir(self.folder(source))
        return previous

    def rollback(self, source: str) -> str:
        """Make `previous` current again (and forget it: a second rollback has nowhere to go);
        the version now current."""
        current, previous = self._pointer(source)
        if previous is None:
            raise BaselineError(self.folder(source) / CURRENT, "no previous baseline to go back to")
        if not self.path_of(source, previous).is_file():
            raise BaselineError(self.path_of(source, previous), "the previous baseline is gone")
        self._write_current(source, previous, None)
        fsync_dir(self.folder(source))
        log.warning("baseline of %s rolled back from %s to %s", source, current, previous)
        return previous

    def _make_current(self, source: str, version: str) -> str | None:
        current, previous = self._pointer(source)
        if current == version:
            return previous
        self._write_current(source, version, current)
        return current

    def _write_current(self, source: str, version: str, previous: str | None) -> None:
        # One file names both, replaced in one rename: a power cut leaves the old pair or the new.
        folder = self.folder(source)
        partial = folder / f".{CURRENT}.partial"
        with partial.open("w", encoding="utf-8") as handle:
            json.dump({"version": version, "previous": previous}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(folder / CURRENT)

    def _pointer(self, source: str) -> tuple[str | None, str | None]:
        try:
            doc = json.loads((self.folder(source) / CURRENT).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as exc:
            log.warning("baseline of %s: unreadable %s (%s); fitting anew", source, CURRENT, exc)
            return None, None
        if not isinstance(doc, dict):
            return None, None
        version, previous = doc.get("version"), doc.get("previous")
        return (
            version if isinstance(version, str) else None,
            previous if isinstance(previous, str) else None,
        )

    def current_version(self, source: str) -> str | None:
        return self._pointer(source)[0]

    def previous_version(self, source: str) -> str | None:
        """The baseline the current one replaced (None after a rollback or before any swap)."""
        return self._pointer(source)[1]

    def load(self, source: str, version: str) -> Baseline:
        """One saved version (`BaselineError` naming the file when it is missing or damaged)."""
        return Baseline.load(self.path_of(source, version))

    def load_current(self, source: str) -> Baseline | None:
        """The baseline in use for `source`, or None (none yet, or its file is damaged: logged,
        and the caller fits a new one rather than scoring with a broken one)."""
        version = self.current_version(source)
        if version is None:
            return None
        try:
            return self.load(source, version)
        except (OSError, BaselineError) as exc:
            log.warning("baseline of %s: %s; fitting anew", source, exc)
            return None

    def prune(self, source: str, keep: int) -> list[str]:
        """Delete all but the newest `keep` versions, never the current or previous one; the
        versions deleted."""
        pinned = set(self._pointer(source))
        spare = [v for v in self.versions(source) if v not in pinned]
        doomed = spare[: max(0, len(spare) - keep)]
        for version in doomed:
            self.path_of(source, version).unlink(missing_ok=True)
        if doomed:
            fsync_dir(self.folder(source))
        return doomed

    def versions(self, source: str) -> list[str]:
        """Every saved version of `source`, oldest first."""
        folder = self.folder(source)
        if not folder.is_dir():
            return []
        files = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        return [p.stem for p in files]
