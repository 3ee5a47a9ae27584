"""Owns the installed model packages under DATA_DIR/models/packages: importing (verified in a
staging folder, then renamed into place), the active / previous pointer of each name, activation
and rollback, pruning old versions, and resolving a name to its active model, verified again.

Layout (docs/model-packages.md):

    packages/.lock                 flock: one changing command at a time
    packages/.staging/             imports in progress and folders being deleted
    packages/history.jsonl         one line per import, activation, rollback and prune
    packages/NAME/active.json      {"active": VERSION, "previous": VERSION | null}
    packages/NAME/VERSION/         manifest.json, manifest.sig, the files, imported.json
                                   (and refused.json once its canary or watch refused it)

Every change is one rename (a staged folder into NAME/VERSION, a new active.json over the old):
a crash at any point leaves the old state or the new one, and what is left in .staging is
removed by the next change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from config import ApplianceConfig, ConfigError
from config.names import NAME_PATTERN, VERSION_PATTERN
from inference.package_keys import PackageKeyError, TrustedKeys
from inference.package_manifest import RESERVED_VERSIONS, PackageError
from inference.packages import VerifiedPackage, read_package, verify_installed
from inference.session import ModelError
from sync.payloads import fsync_dir

POINTER = "active.json"
IMPORTED = "imported.json"
REFUSED = "refused.json"
HISTORY = "history.jsonl"
STAGING = ".staging"
LOCK = ".lock"

State = Literal["active", "previous", "staged", "refused"]


class StoreError(ModelError):
    """A store operation that cannot be done as asked (nothing to roll back to, a version
    imported twice with other bytes, a damaged pointer). `path` is the store folder concerned."""


class UnknownPackage(StoreError):
    """The name or version asked for is not installed (the user's input; the CLI exits 2)."""


@dataclass(frozen=True, slots=True)
class PackageEntry:
    """One installed version, as `models list` shows it."""

    name: str
    version: str
    task: str
    state: State
    imported_at: str
    sha256: str
    signed_by: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """One change of the store (import, activate, rollback, prune, refuse): appended to
    history.jsonl, and what a daemon journals."""

    action: Literal["import", "activate", "rollback", "prune", "refuse"]
    name: str
    version: str
    previous: str | None
    at: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Pointer:
    active: str | None
    previous: str | None


def _now() -> str:
    # Microseconds: versions are ordered by import time, and imports can come close together.
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def packages_dir(data_dir: Path) -> Path:
    """Where a data directory keeps its installed packages."""
    return data_dir / "models" / "packages"


class ModelStore:
    """The packages installed on this appliance. Changing calls take an exclusive flock on
    `.lock` (two CLI calls, or a CLI call and the daemon, never interleave); reading calls a
    shared one."""

    def __init__(
        self,
        root: Path,
        trusted: TrustedKeys,
        *,
        appliance_id: str,
        group: str | None = None,
        keep: int = 3,
    ) -> None:
        if keep < 2:
            raise ValueError(f"keep must be at least 2 (the active and the previous), got {keep}")
        self.root = root
        self.trusted = trusted
        self.appliance_id = appliance_id
        self.group = group
        self.keep = keep

    @classmethod
    def from_config(cls, cfg: ApplianceConfig) -> ModelStore:
        section = cfg.model_packages
        try:
            trusted = TrustedKeys.parse(section.trusted_keys)
        except PackageKeyError as exc:
            raise ConfigError(str(exc), key="model_packages.trusted_keys", line=None) from None
        return cls(
            packages_dir(cfg.appliance.data_dir),
            trusted,
            appliance_id=cfg.appliance.id,
            group=section.group,
            keep=section.keep,
        )

    # -- locking and small files ------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        if exclusive:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _staging(self) -> Path:
        """The staging folder, emptied of what an interrupted change left there."""
        staging = self.root / STAGING
        if staging.is_dir():
            for leftover in staging.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def _record(self, event: StoreEvent) -> StoreEvent:
        line = json.dumps(event.as_dict(), sort_keys=True).encode() + b"\n"
        with (self.root / HISTORY).open("a+b") as handle:
            end = handle.seek(0, os.SEEK_END)
            if end and os.pread(handle.fileno(), 1, end - 1) != b"\n":
                line = b"\n" + line  # end a line torn by a crash, so this one stays whole
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        return event

    def history(self) -> list[dict[str, Any]]:
        """Every recorded change, oldest first (a line torn by a crash mid-write is skipped)."""
        try:
            lines = (self.root / HISTORY).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def _name_dir(self, name: str) -> Path:
        if not re.fullmatch(NAME_PATTERN, name):
            raise UnknownPackage(self.root, f"{name!r} is not a package name")
        return self.root / name

    def _version_dir(self, name: str, version: str) -> Path:
        if not re.fullmatch(VERSION_PATTERN, version) or version in RESERVED_VERSIONS:
            raise UnknownPackage(self.root, f"{version!r} is not a package version")
        return self._name_dir(name) / version

    def _read_pointer(self, name: str) -> _Pointer:
        path = self._name_dir(name) / POINTER
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return _Pointer(None, None)
        except (OSError, ValueError) as exc:
            raise StoreError(path, f"unreadable pointer ({exc})") from None
        if not isinstance(doc, dict):
            raise StoreError(path, "damaged pointer: not a JSON object")
        values = [doc.get("active"), doc.get("previous")]
        if not all(v is None or isinstance(v, str) for v in values):
            raise StoreError(path, f"damaged pointer: {doc}")
        return _Pointer(values[0], values[1])

    def _write_pointer(self, name: str, pointer: _Pointer) -> None:
        """tmp + fsync + rename + fsync of the folder: a crash leaves the old pointer or the new."""
        folder = self._name_dir(name)
        partial = folder / f".{POINTER}.partial"
        try:
            with partial.open("w", encoding="utf-8") as handle:
                json.dump({"active": pointer.active, "previous": pointer.previous}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            partial.replace(folder / POINTER)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_dir(folder)

    def _imported(self, folder: Path) -> dict[str, Any]:
        try:
            doc = json.loads((folder / IMPORTED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _versions(self, name: str) -> list[str]:
        """Installed versions of `name`, oldest import first."""
        folder = self._name_dir(name)
        if not folder.is_dir():
            return []
        found = [
            (self._imported(child).get("imported_at", ""), child.name)
            for child in folder.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        ]
        return [version for _, version in sorted(found)]

    def _verified(self, name: str, version: str) -> VerifiedPackage:
        folder = self._version_dir(name, version)
        if not folder.is_dir():
            installed = ", ".join(self._versions(name)) or "none"
            raise UnknownPackage(
                folder, f"{name} {version} is not installed (installed versions: {installed})"
            )
        return verify_installed(
            folder, self.trusted, appliance_id=self.appliance_id, group=self.group
        )

    # -- changes ------------------------------------------------------------------------------------

    def import_package(self, package: Path) -> tuple[VerifiedPackage, list[StoreEvent]]:
        """Verify `package` and install it as a staged version (not active). Importing the same
        bytes again changes nothing; a version is never replaced by other bytes."""
        with self._locked(exclusive=True):
            stage = self._staging() / uuid.uuid4().hex
            verified = read_package(
                package,
                self.trusted,
                into=stage,
                appliance_id=self.appliance_id,
                group=self.group,
            )
            manifest = verified.manifest
            target = self._version_dir(manifest.name, manifest.version)
            if target.exists():
                shutil.rmtree(stage, ignore_errors=True)
                installed = self._imported(target).get("manifest_sha256")
                if installed == verified.manifest_sha256:
                    return self._verified(manifest.name, manifest.version), []
                raise StoreError(
                    package,
                    f"{verified.ref} is already installed with other contents; a version is "
                    "never replaced (publish a new version)",
                )
            imported_at = _now()
            doc = {
                "imported_at": imported_at,
                "source": str(Path(package).resolve()),
                "manifest_sha256": verified.manifest_sha256,
                "signed_by": verified.signer.describe(),
            }
            with (stage / IMPORTED).open("w", encoding="utf-8") as handle:
                json.dump(doc, handle)
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(stage)
            target.parent.mkdir(exist_ok=True)
            try:
                stage.replace(target)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
            fsync_dir(target.parent)
            events = [
                self._record(
                    StoreEvent(
                        "import",
                        manifest.name,
                        manifest.version,
                        None,
                        imported_at,
                        f"sha256 {verified.model_sha256}, signed by {doc['signed_by']}",
                    )
                )
            ]
            events += self._prune(manifest.name, protect=manifest.version)
        return dataclasses.replace(verified, directory=target), events

    def activate(self, name: str, version: str) -> StoreEvent | None:
        """Make `version` the active one (the active one becomes the previous); verified again
        first, so a version altered on disk is never made active. None: it already was."""
        with self._locked(exclusive=True):
            self._verified(name, version)
            pointer = self._read_pointer(name)
            if pointer.active == version:
                return None
            self._staging()
            self._write_pointer(name, _Pointer(version, pointer.active))
            # Activating by hand overrides a canary's refusal.
            self._clear_refusal(name, version)
            event = self._record(StoreEvent("activate", name, version, pointer.active, _now()))
            self._prune(name, protect=version)
        return event

    def rollback(self, name: str) -> StoreEvent:
        """Make the previous version active again (and the one rolled back from the previous)."""
        with self._locked(exclusive=True):
            pointer = self._read_pointer(name)
            if pointer.active is None:
                raise UnknownPackage(self._name_dir(name), f"{name} has no active version")
            if pointer.previous is None:
                raise StoreError(
                    self._name_dir(name),
                    f"{name} has no previous version to roll back to (active: {pointer.active})",
                )
            self._verified(name, pointer.previous)
            self._staging()
            self._write_pointer(name, _Pointer(pointer.previous, pointer.active))
            self._clear_refusal(name, pointer.previous)
            return self._record(
                StoreEvent("rollback", name, pointer.previous, pointer.active, _now())
            )

    def refuse(self, name: str, version: str, reason: str) -> StoreEvent:
        """Mark an installed version refused (its canary failed, or its watch rolled it back), so
        it is never tried again by itself; `appliance models activate` still may. The active
        version cannot be refused (roll back first)."""
        with self._locked(exclusive=True):
            folder = self._version_dir(name, version)
            if not folder.is_dir():
                installed = ", ".join(self._versions(name)) or "none"
                raise UnknownPackage(
                    folder, f"{name} {version} is not installed (installed versions: {installed})"
                )
            pointer = self._read_pointer(name)
            if pointer.active == version:
                raise StoreError(
                    folder, f"{name} {version} is the active version; roll back before refusing it"
                )
            at = _now()
            partial = folder / f".{REFUSED}.partial"
            try:
                with partial.open("w", encoding="utf-8") as handle:
                    json.dump({"refused_at": at, "reason": reason}, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                partial.replace(folder / REFUSED)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            fsync_dir(folder)
            return self._record(StoreEvent("refuse", name, version, pointer.active, at, reason))

    def _clear_refusal(self, name: str, version: str) -> None:
        refused = self._version_dir(name, version) / REFUSED
        if refused.exists():
            refused.unlink()
            fsync_dir(refused.parent)

    def refusal(self, name: str, version: str) -> str | None:
        """Why `version` was refused, or None when it was not."""
        try:
            doc = json.loads(
                (self._version_dir(name, version) / REFUSED).read_text(encoding="utf-8")
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return f"refused (unreadable {REFUSED}: {exc})"
        reason = doc.get("reason") if isinstance(doc, dict) else None
        return str(reason) if reason else "refused"

    def _prune(self, name: str, *, protect: str) -> list[StoreEvent]:
        """Delete the oldest versions beyond `keep`, never the active, the previous or `protect`.
        Each goes by one rename into .staging first, so a crash never leaves half a version."""
        pointer = self._read_pointer(name)
        kept = {v for v in (pointer.active, pointer.previous, protect) if v is not None}
        versions = self._versions(name)
        room = max(self.keep - len(kept), 0)
        others = [v for v in reversed(versions) if v not in kept]  # newest first
        events = []
        for version in others[room:]:
            trash = self._staging() / f"prune-{uuid.uuid4().hex}"
            (self._name_dir(name) / version).replace(trash)
            shutil.rmtree(trash, ignore_errors=True)
            events.append(self._record(StoreEvent("prune", name, version, None, _now())))
        if events:
            fsync_dir(self._name_dir(name))
        return events

    # -- reading --------------------------------------------------------------------------------

    def resolve(self, name: str) -> VerifiedPackage:
        """The active version of `name`, verified again (signature, addressing, every file's
        sha256): what a `package:NAME` model loads."""
        if not self.root.is_dir():
            raise UnknownPackage(self.root, f"no package named {name!r} is installed (none is)")
        with self._locked(exclusive=False):
            folder = self._name_dir(name)
            if not folder.is_dir():
                names = ", ".join(self._names()) or "none"
                raise UnknownPackage(
                    self.root, f"no package named {name!r} is installed (installed: {names})"
                )
            pointer = self._read_pointer(name)
            if pointer.active is None:
                raise UnknownPackage(
                    folder,
                    f"{name} has no active version (activate one: appliance models activate "
                    f"{name} VERSION)",
                )
            return self._verified(name, pointer.active)

    def resolve_version(self, name: str, version: str) -> VerifiedPackage:
        """One installed version of `name`, whatever its state, verified again: what a canary
        runs in shadow."""
        with self._locked(exclusive=False):
            return self._verified(name, version)

    def pointer(self, name: str) -> tuple[str | None, str | None]:
        """(active, previous) versions of `name`; (None, None) when it has none. One read of the
        pointer file, which changes only by rename, so it is never seen half written."""
        pointer = self._read_pointer(name)
        return pointer.active, pointer.previous

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            child.name
            for child in self.root.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        )

    def entries(self) -> list[PackageEntry]:
        """Every installed version with its state; it reads manifests without verifying them
        (`resolve`, `activate` and `models verify` verify)."""
        if not self.root.is_dir():
            return []
        found: list[PackageEntry] = []
        with self._locked(exclusive=False):
            for name in self._names():
                pointer = self._read_pointer(name)
                for version in self._versions(name):
                    folder = self.root / name / version
                    found.append(self._entry(name, version, folder, pointer))
        return found

    def _entry(self, name: str, version: str, folder: Path, pointer: _Pointer) -> PackageEntry:
        state: State = (
            "active"
            if version == pointer.active
            else "previous"
            if version == pointer.previous
            else "refused"
            if (folder / REFUSED).exists()
            else "staged"
        )
        imported = self._imported(folder)
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            task = str(manifest["task"])
            sha256 = str(manifest["files"][manifest["model"]]["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            task, sha256 = "?", "? (unreadable manifest)"
        return PackageEntry(
            name=name,
            version=version,
            task=task,
            state=state,
            imported_at=str(imported.get("imported_at", "?")),
            sha256=sha256,
            signed_by=str(imported.get("signed_by", "?")),
        )

    def active_version(self, name: str) -> str | None:
        return self._read_pointer(name).active


__all__ = [
    "ModelStore",
    "PackageEntry",
    "PackageError",
    "StoreError",
    "StoreEvent",
    "UnknownPackage",
    "packages_dir",
]
