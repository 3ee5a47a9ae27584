"""Owns the model package archive: one plain tar per package holding `manifest.json`,
`manifest.sig` (an Ed25519 signature of the manifest's exact bytes) and the files the manifest
names; building and signing one, reading one back with every check done before any of its bytes
count as a model, what a verified package is, and how a detector config takes its settings.

Reading order (docs/model-packages.md): the signature against the trusted keys first, then the
manifest's fields, then whom it is addressed to, then each file's size and sha256 while it is
copied into a staging folder. Every refusal is a `PackageError` naming the package and the cause.
The manifest models are `inference/package_manifest.py`'s, the keys `inference/package_keys.py`'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from config.cameras import DetectorModel
from inference.package_keys import KEY_ID_PATTERN, TrustedKey, TrustedKeys, key_id
from inference.package_manifest import (
    FILE_PATTERN,
    FORMAT_VERSION,
    LABELS_FILE,
    MANIFEST,
    SIGNATURE,
    CanaryLimits,
    FileEntry,
    Manifest,
    PackageError,
    Task,
    Thresholds,
    describe_onnx_input,
    parse_labels,
    validation_message,
)

PREFIX = "package:"
SIGNATURE_BYTES = 64
MAX_MANIFEST_BYTES = 1024 * 1024
# The end-of-archive marker: two zero blocks. A download cut anywhere, even after the last
# member, lacks it.
_BLOCK = 512
_END_MARKER = 2 * _BLOCK
_COPY_CHUNK = 1 << 20
MODEL_SUFFIXES = {".onnx": "model.onnx", ".npz": "model.npz"}


# -- what a verified package is --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedPackage:
    """A package whose signature, manifest, addressing and files have all been checked.

    `source` is what was verified (the package file, or an installed folder), `directory` holds
    its files (manifest included)."""

    source: Path
    directory: Path
    manifest: Manifest
    manifest_sha256: str
    signer: TrustedKey

    @property
    def model_path(self) -> Path:
        return self.directory / self.manifest.model

    @property
    def model_sha256(self) -> str:
        return self.manifest.files[self.manifest.model].sha256

    @property
    def ref(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"

    def labels(self) -> tuple[str, ...] | None:
        """Class names from the manifest or its labels.txt; None when the package gives none."""
        if self.manifest.labels is not None:
            return tuple(self.manifest.labels)
        if LABELS_FILE in self.manifest.files:
            return parse_labels(self.source, (self.directory / LABELS_FILE).read_bytes())
        return None

    def summary(self) -> dict[str, Any]:
        """What `models verify` prints."""
        manifest = self.manifest
        labels = self.labels()
        return {
            "name": manifest.name,
            "version": manifest.version,
            "task": manifest.task,
            "created_at": manifest.created_at.isoformat(),
            "signed_by": self.signer.describe(),
            "model": manifest.model,
            "model_sha256": self.model_sha256,
            "files": {n: e.model_dump() for n, e in manifest.files.items()},
            "input": None if manifest.input is None else manifest.input.model_dump(),
            "labels": None if labels is None else len(labels),
            "thresholds": manifest.thresholds.model_dump(exclude_none=True),
            "metrics": dict(manifest.metrics),
            "canary": None if manifest.canary is None else manifest.canary.model_dump(),
            "targets": list(manifest.targets) or "any appliance",
        }


class PackageResolver(Protocol):
    """Finds the verified active version of an installed package (the appliance's model store)."""

    def resolve(self, name: str) -> VerifiedPackage: ...


def detector_settings(
    cfg: DetectorModel, package: VerifiedPackage
) -> tuple[DetectorModel, tuple[str, ...] | None]:
    """`cfg` with the package's version and thresholds filled in where the config leaves them
    unset, and the package's labels unless the config names a labels_file."""
    manifest = package.manifest
    if manifest.task != "detector":
        raise PackageError(
            package.source,
            f"{package.ref} is a model for task {manifest.task!r}, not a detector",
            cause="wrong_task",
        )
    explicit = cfg.model_fields_set
    update: dict[str, Any] = {}
    if "version" not in explicit:
        update["version"] = manifest.version
    for field in ("score_threshold", "nms_iou"):
        value = getattr(manifest.thresholds, field)
        if field not in explicit and value is not None:
            update[field] = value
    labels = None if cfg.labels_file is not None else package.labels()
    return cfg.model_copy(update=update), labels


# -- building --------------------------------------------------------------------------------------


def _file_entry(data_path: Path) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with data_path.open("rb") as handle:
        for block in iter(lambda: handle.read(_COPY_CHUNK), b""):
            digest.update(block)
            size += len(block)
    return FileEntry(sha256=digest.hexdigest(), size=size)


def build_package(
    output: Path,
    private_key: Ed25519PrivateKey,
    *,
    name: str,
    version: str,
    task: Task,
    model: Path,
    labels: Sequence[str] | None = None,
    labels_file: Path | None = None,
    thresholds: Thresholds | None = None,
    metrics: Mapping[str, float] | None = None,
    canary: CanaryLimits | None = None,
    targets: Sequence[str] = (),
    created_at: datetime | None = None,
) -> Manifest:
    """Write a signed package to `output` (atomically); its manifest. `labels_file` is shipped as
    labels.txt; `labels` go inline in the manifest. Bad input raises ValueError naming it."""
    member = MODEL_SUFFIXES.get(model.suffix)
    if member is None:
        raise ValueError(f"{model}: a model file ends in {' or '.join(MODEL_SUFFIXES)}")
    if not model.is_file():
        raise ValueError(f"{model}: not a readable file")
    sources: dict[str, Path] = {member: model}
    if labels_file is not None:
        if not labels_file.is_file():
            raise ValueError(f"{labels_file}: not a readable file")
        parse_labels(labels_file, labels_file.read_bytes())
        sources[LABELS_FILE] = labels_file
    spec = describe_onnx_input(model, task) if member.endswith(".onnx") else None
    try:
        manifest = Manifest.model_validate(
            {
                "format": FORMAT_VERSION,
                "name": name,
                "version": version,
                "task": task,
                "created_at": created_at or datetime.now(UTC).replace(microsecond=0),
                "key_id": key_id(private_key.public_key()),
                "model": member,
                "files": {n: _file_entry(p) for n, p in sources.items()},
                "input": spec,
                "labels": None if labels is None else list(labels),
                "thresholds": thresholds or Thresholds(),
                "metrics": {k: float(v) for k, v in (metrics or {}).items()},
                "canary": canary,
                "targets": list(targets),
            }
        )
    except ValidationError as exc:
        raise ValueError(f"the manifest would be invalid: {validation_message(exc)}") from None
    manifest_bytes = manifest.encode()
    signature = private_key.sign(manifest_bytes)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    mtime = int(manifest.created_at.timestamp())
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
            _add_bytes(archive, MANIFEST, manifest_bytes, mtime)
            _add_bytes(archive, SIGNATURE, signature, mtime)
            for member_name, source in sources.items():
                info = tarfile.TarInfo(member_name)
                info.size = manifest.files[member_name].size
                info.mtime, info.mode = mtime, 0o644
                with source.open("rb") as handle:
                    archive.addfile(info, handle)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        partial.replace(output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return manifest


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    archive.addfile(info, io.BytesIO(data))


# -- reading and verifying -------------------------------------------------------------------------


def _verified_manifest(
    source: Path, manifest_bytes: bytes, signature: bytes, trusted: TrustedKeys
) -> tuple[Manifest, TrustedKey]:
    """Signature first (over the exact bytes), only then the manifest's fields."""
    signer = trusted.verifying(manifest_bytes, signature)
    if signer is None:
        claimed = _claimed_key_id(manifest_bytes)
        if claimed is not None and trusted.get(claimed) is None:
            raise PackageError(
                source,
                f"signed with key id {claimed}, which is not a trusted key (trusted: "
                f"{trusted.describe()})",
                cause="unknown_key",
            )
        raise PackageError(
            source,
            "bad signature: the manifest or its signature was altered, or it was signed with "
            f"another key than the one it names (trusted: {trusted.describe()})",
            cause="bad_signature",
        )
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as exc:
        raise PackageError(
            source,
            f"{MANIFEST} is signed but invalid: {validation_message(exc)}",
            cause="bad_manifest",
        ) from None
    if manifest.key_id != signer.key_id:
        raise PackageError(
            source,
            f"{MANIFEST} names key id {manifest.key_id} but was signed by {signer.describe()}",
            cause="bad_signature",
        )
    return manifest, signer


def _claimed_key_id(manifest_bytes: bytes) -> str | None:
    """The key id an unverified manifest claims, only to tell "unknown key" from "bad signature"
    in the message; nothing else of an unverified manifest is believed."""
    try:
        doc = json.loads(manifest_bytes)
    except ValueError:
        return None
    value = doc.get("key_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and re.fullmatch(KEY_ID_PATTERN, value) else None


def check_addressed(source: Path, manifest: Manifest, appliance_id: str, group: str | None) -> None:
    """Refuse a package whose targets name neither this appliance nor its group."""
    targets = manifest.targets
    if not targets or appliance_id in targets or (group and f"group:{group}" in targets):
        return
    mine = f"appliance {appliance_id}" + (f" / group {group}" if group else " (no group set)")
    raise PackageError(
        source,
        f"{manifest.name} {manifest.version} is not addressed to {mine}: its targets are "
        f"{', '.join(targets)}",
        cause="not_addressed",
    )


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if member.issym() or member.islnk():
        return f"member {name!r} is a link; packages hold plain files only"
    if not member.isreg():
        return f"member {name!r} is not a plain file"
    if "/" in name or "\\" in name or name in (".", ".."):
        return f"member {name!r} is a path; packages hold plain file names only"
    if not re.fullmatch(FILE_PATTERN, name) or len(name) > 64:
        return f"member {name!r} is not a plain file name"
    return None


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    handle = archive.extractfile(member)
    assert handle is not None  # a regular file, checked by _member_problem
    data = handle.read(limit + 1)
    if len(data) != member.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _copy_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path
) -> tuple[str, int]:
    """Copy one member's bytes to `target`; (sha256, size)."""
    handle = archive.extractfile(member)
    assert handle is not None
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out:
        for block in iter(lambda: handle.read(_COPY_CHUNK), b""):
            digest.update(block)
            out.write(block)
            size += len(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def _is_tar(head: bytes) -> bool:
    return len(head) >= 263 and head[257:262] == b"ustar"


def read_package(
    path: Path, trusted: TrustedKeys, *, into: Path, appliance_id: str, group: str | None
) -> VerifiedPackage:
    """Verify the package file `path` and copy its files into `into` (a folder that must not
    exist yet; it is removed again on any failure)."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise PackageError(
            path, f"cannot read it ({exc.strerror or exc})", cause="unreadable"
        ) from None
    with handle:
        head = handle.read(_BLOCK)
        if len(head) < _BLOCK:
            raise PackageError(
                path,
                f"truncated archive: the file is only {len(head)} bytes (a cut download?)",
                cause="truncated",
            )
        if not _is_tar(head):
            raise PackageError(
                path,
                "not a model package: no tar header (a package is the .tar `appliance models "
                "pack` writes)",
                cause="not_a_package",
            )
        handle.seek(0)
        into.mkdir()
        try:
            return _read_stream(path, handle, trusted, into, appliance_id, group)
        except BaseException:
            shutil.rmtree(into, ignore_errors=True)
            raise


def _read_stream(
    path: Path,
    handle: IO[bytes],
    trusted: TrustedKeys,
    into: Path,
    appliance_id: str,
    group: str | None,
) -> VerifiedPackage:
    try:
        with tarfile.open(fileobj=handle, mode="r|") as archive:
            members: Iterator[tarfile.TarInfo] = iter(archive)
            manifest_member = _next_member(path, members, MANIFEST, MAX_MANIFEST_BYTES)
            manifest_bytes = _read_member(archive, manifest_member, MAX_MANIFEST_BYTES)
            signature_member = _next_member(path, members, SIGNATURE, SIGNATURE_BYTES)
            if signature_member.size != SIGNATURE_BYTES:
                raise PackageError(
                    path,
                    f"{SIGNATURE} is {signature_member.size} bytes; an Ed25519 signature has "
                    f"{SIGNATURE_BYTES}",
                    cause="bad_signature",
                )
            signature = _read_member(archive, signature_member, SIGNATURE_BYTES)
            manifest, signer = _verified_manifest(path, manifest_bytes, signature, trusted)
            check_addressed(path, manifest, appliance_id, group)
            _write_file(into / MANIFEST, manifest_bytes)
            _write_file(into / SIGNATURE, signature)
            last = signature_member
            seen: set[str] = set()
            for member in members:
                _check_file_member(path, manifest, member, seen)
                sha256, size = _copy_member(archive, member, into / member.name)
                _check_file(path, manifest, member.name, sha256, size)
                seen.add(member.name)
                last = member
            missing = sorted(set(manifest.files) - seen)
            if missing:
                raise PackageError(
                    path,
                    f"truncated archive: {', '.join(missing)} missing (named in the manifest)",
                    cause="truncated",
                )
            _check_end_marker(path, handle, last)
    except (tarfile.TarError, EOFError) as exc:
        raise PackageError(
            path, f"truncated or damaged archive ({exc}): download it again", cause="truncated"
        ) from None
    package = VerifiedPackage(
        source=path,
        directory=into,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        signer=signer,
    )
    _check_contents(package)
    return package


def _next_member(
    path: Path, members: Iterator[tarfile.TarInfo], expected: str, limit: int
) -> tarfile.TarInfo:
    member = next(members, None)
    if member is None:
        raise PackageError(path, f"truncated archive: {expected} missing", cause="truncated")
    problem = _member_problem(member)
    if problem is not None:
        raise PackageError(path, problem, cause="bad_member")
    if member.name != expected:
        raise PackageError(
            path,
            f"expected {expected} as the next member, found {member.name!r} (not a package "
            "written by `appliance models pack`)",
            cause="not_a_package",
        )
    if member.size > limit:
        raise PackageError(
            path, f"{expected} is {member.size} bytes, more than {limit}", cause="bad_member"
        )
    return member


def _check_file_member(
    path: Path, manifest: Manifest, member: tarfile.TarInfo, seen: set[str]
) -> None:
    problem = _member_problem(member)
    if problem is not None:
        raise PackageError(path, problem, cause="bad_member")
    name = member.name
    entry = manifest.files.get(name)
    if entry is None:
        raise PackageError(
            path, f"member {name!r} is not one of the files the manifest names", cause="bad_member"
        )
    if name in seen:
        raise PackageError(path, f"member {name!r} appears twice", cause="bad_member")
    if member.size != entry.size:
        raise PackageError(
            path,
            f"size mismatch for {name}: the archive holds {member.size} bytes, the manifest "
            f"says {entry.size}",
            cause="hash_mismatch",
        )


def _check_file(path: Path, manifest: Manifest, name: str, sha256: str, size: int) -> None:
    entry = manifest.files[name]
    if size != entry.size:
        raise PackageError(
            path,
            f"truncated archive: {name} has {size} of {entry.size} bytes",
            cause="truncated",
        )
    if sha256 != entry.sha256:
        raise PackageError(
            path,
            f"hash mismatch for {name}: its sha256 is {sha256}, the manifest says "
            f"{entry.sha256} (altered in transit or on disk)",
            cause="hash_mismatch",
        )


def _check_end_marker(path: Path, handle: IO[bytes], last: tarfile.TarInfo) -> None:
    """A cut after the last member is still a cut download: require the two zero blocks."""
    end = last.offset_data + -(-last.size // _BLOCK) * _BLOCK
    handle.seek(end)
    marker = handle.read(_END_MARKER)
    if len(marker) != _END_MARKER or marker.count(0) != _END_MARKER:
        raise PackageError(
            path, "truncated archive: the end-of-archive marker is missing", cause="truncated"
        )


def _write_file(target: Path, data: bytes) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _check_contents(package: VerifiedPackage) -> None:
    """What the hashes cannot say: the labels parse, and the model's input is the one the
    manifest declares (so the manifest describes this model, not another)."""
    package.labels()
    manifest = package.manifest
    if manifest.input is None or not manifest.model.endswith(".onnx"):
        return
    try:
        actual = describe_onnx_input(package.model_path, manifest.task)
    except ValueError as exc:
        raise PackageError(package.source, str(exc), cause="bad_manifest") from None
    declared = manifest.input
    fits = (
        len(actual.shape) == len(declared.shape)
        and actual.dtype == declared.dtype
        and (declared.layout is None or actual.layout == declared.layout)
        and all(a is None or a == d for a, d in zip(actual.shape, declared.shape, strict=True))
    )
    if not fits:
        raise PackageError(
            package.source,
            f"the manifest declares input {declared.model_dump()}, the model has "
            f"{actual.model_dump()}",
            cause="bad_manifest",
        )


def verify_installed(
    directory: Path, trusted: TrustedKeys, *, appliance_id: str, group: str | None
) -> VerifiedPackage:
    """Check an installed package folder again, as at import: signature, manifest, addressing,
    and each file's size and sha256 (a file changed on disk is refused, never loaded)."""
    try:
        manifest_bytes = _read_small(directory / MANIFEST, MAX_MANIFEST_BYTES)
        signature = _read_small(directory / SIGNATURE, SIGNATURE_BYTES)
    except OSError as exc:
        raise PackageError(
            directory, f"incomplete installed package ({exc.strerror or exc})", cause="truncated"
        ) from None
    manifest, signer = _verified_manifest(directory, manifest_bytes, signature, trusted)
    check_addressed(directory, manifest, appliance_id, group)
    for name, entry in manifest.files.items():
        file_path = directory / name
        if not file_path.is_file() or file_path.is_symlink():
            raise PackageError(
                directory, f"{name} is missing or not a plain file", cause="truncated"
            )
        actual = _file_entry(file_path)
        if actual.size != entry.size or actual.sha256 != entry.sha256:
            raise PackageError(
                directory,
                f"hash mismatch for {name}: the file on disk changed since it was imported "
                f"(sha256 {actual.sha256}, {actual.size} bytes; the manifest says "
                f"{entry.sha256}, {entry.size} bytes)",
                cause="hash_mismatch",
            )
    return VerifiedPackage(
        source=directory,
        directory=directory,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        signer=signer,
    )


def _read_small(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path.name} is larger than {limit} bytes")
    return data
