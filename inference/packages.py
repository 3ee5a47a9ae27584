"""Owns the model package format: one plain tar per package holding `manifest.json`,
`manifest.sig` (an Ed25519 signature of the manifest's exact bytes) and the files the manifest
names; building and signing one, and reading one back with every check done before any of its
bytes count as a model.

Reading order (docs/model-packages.md): the signature against the trusted keys first, then the
manifest's fields, then whom it is addressed to, then each file's size and sha256 while it is
copied into a staging folder. Every refusal is a `PackageError` naming the package and the cause.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any, Literal, Protocol

import onnx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from config.cameras import DetectorModel
from config.names import NAME_PATTERN, VERSION_PATTERN
from inference.session import ModelError

FORMAT_VERSION = 1
PREFIX = "package:"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
LABELS_FILE = "labels.txt"
SIGNATURE_BYTES = 64
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_FILE_BYTES = 4 * 1024**3
MAX_FILES = 16
# The end-of-archive marker: two zero blocks. A download cut anywhere, even after the last
# member, lacks it.
_BLOCK = 512
_END_MARKER = 2 * _BLOCK
_COPY_CHUNK = 1 << 20

FILE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"
KEY_ID_PATTERN = r"^[0-9a-f]{16}$"
# Version folders share NAME/ with the pointer file, so a version may not be called like it.
RESERVED_VERSIONS = frozenset({"active.json"})
MODEL_SUFFIXES = {".onnx": "model.onnx", ".npz": "model.npz"}

Task = Literal["detector", "anomaly"]
Dtype = Literal["float32", "float16", "float64", "uint8", "int64"]
_ONNX_DTYPES: dict[int, Dtype] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT64: "int64",
}
_IMAGE_DTYPES: frozenset[str] = frozenset({"float32", "float16", "uint8"})


class PackageError(ModelError):
    """A package that must not be used: `path` is the package file (or its installed folder),
    `reason` says what is wrong and `cause` names the check that failed (`bad_signature`,
    `unknown_key`, `hash_mismatch`, `truncated`, `not_addressed`, `bad_member`, `bad_manifest`,
    `not_a_package`, `wrong_task`, `unreadable`). Permanent: the same bytes fail the same way."""

    def __init__(self, path: Path | str, reason: str, *, cause: str) -> None:
        super().__init__(path, reason)
        self.cause = cause


class PackageKeyError(ValueError):
    """A key (trusted public key or publisher's private key) that cannot be used."""


# -- manifest ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the file.")
    size: int = Field(ge=0, le=MAX_FILE_BYTES, description="Bytes.")


class InputSpec(_Strict):
    shape: list[Annotated[int, Field(gt=0)] | None] = Field(
        min_length=1, max_length=8, description="Input dimensions; null where dynamic."
    )
    dtype: Dtype = Field(description="Element type of the input tensor.")
    layout: Literal["nchw", "nhwc"] | None = Field(
        default=None, description="Image layout (detectors); null for other models."
    )


class Thresholds(_Strict):
    score_threshold: float | None = Field(
        default=None, gt=0, lt=1, description="Detectors: detections below it are dropped."
    )
    nms_iou: float | None = Field(
        default=None, gt=0, le=1, description="Detectors: overlap above which NMS keeps one box."
    )
    threshold: float | None = Field(
        default=None, gt=0, description="Anomaly models: score above which a window is anomalous."
    )


class CanaryLimits(_Strict):
    min_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Least share of shadow results agreeing with the active model.",
    )
    max_latency_ratio: float | None = Field(
        default=None, gt=0, description="Most latency relative to the active model."
    )
    max_error_rate: float | None = Field(
        default=None, ge=0, le=1, description="Most share of failed runs."
    )


class Manifest(_Strict):
    """What a package is, whom it is for and how its files hash; signed as exact bytes."""

    format: int = Field(description="Package format version.")
    name: str = Field(pattern=NAME_PATTERN, description="Model name (package:NAME in configs).")
    version: str = Field(pattern=VERSION_PATTERN, description="Version, unique per name.")
    task: Task = Field(description="What the model does.")
    created_at: AwareDatetime = Field(description="When the publisher built the package.")
    key_id: str = Field(pattern=KEY_ID_PATTERN, description="Fingerprint of the signing key.")
    model: str = Field(description="The model file, one of `files`.")
    files: dict[str, FileEntry] = Field(
        min_length=1, max_length=MAX_FILES, description="Every file in the package."
    )
    input: InputSpec | None = Field(default=None, description="The model's input tensor.")
    labels: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None,
        min_length=1,
        max_length=100_000,
        description="Class names (or a labels.txt file).",
    )
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Decision thresholds.")
    metrics: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:/-]{1,64}$")], float] = Field(
        default_factory=dict, description="Metrics the model was accepted with."
    )
    canary: CanaryLimits | None = Field(
        default=None, description="Limits a shadow canary must meet before activation."
    )
    targets: list[str] = Field(
        default_factory=list,
        description="Appliance ids and `group:NAME`s it is for; empty: any appliance.",
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(
                f"package format {value} is not one this appliance reads (format "
                f"{FORMAT_VERSION}); update the appliance"
            )
        return value

    @field_validator("version")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_VERSIONS:
            raise ValueError(f"{value!r} is a reserved name, not a version")
        return value

    @field_validator("files")
    @classmethod
    def _plain_names(cls, value: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in value:
            if not re.fullmatch(FILE_PATTERN, name) or len(name) > 64:
                raise ValueError(f"file name {name!r} is not a plain file name")
            if name in (MANIFEST, SIGNATURE):
                raise ValueError(f"{name} cannot be one of the files")
        return value

    @field_validator("targets")
    @classmethod
    def _targets_are_ids_or_groups(cls, value: list[str]) -> list[str]:
        for target in value:
            if not re.fullmatch(NAME_PATTERN, target.removeprefix("group:")):
                raise ValueError(f"target {target!r} is neither an appliance id nor group:NAME")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.model not in self.files:
            raise ValueError(f"model {self.model!r} is not one of the files {sorted(self.files)}")
        if self.labels is not None and LABELS_FILE in self.files:
            raise ValueError(f"labels are given twice: inline and as {LABELS_FILE}")
        thresholds = self.thresholds
        if self.task == "detector":
            if not self.model.endswith(".onnx"):
                raise ValueError(f"a detector's model must be an .onnx file, not {self.model!r}")
            if self.input is None or self.input.layout is None:
                raise ValueError("a detector needs `input` with its `layout`")
            if thresholds.threshold is not None:
                raise ValueError("`thresholds.threshold` is for anomaly models")
        else:
            if thresholds.threshold is None:
                raise ValueError("an anomaly model needs `thresholds.threshold`")
            if thresholds.score_threshold is not None or thresholds.nms_iou is not None:
                raise ValueError("`score_threshold` and `nms_iou` are for detectors")
        return self

    def encode(self) -> bytes:
        """The bytes that are signed and shipped (readers verify exactly these, never re-encode)."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one line: `field.path: message; ...`."""
    parts = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


# -- keys ------------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """The short fingerprint a manifest names its signing key by: 16 hex digits of the sha256 of
    the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_text(public_key: Ed25519PublicKey) -> str:
    """The public key as base64 of its 32 raw bytes (what `trusted_keys` takes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (`BEGIN PUBLIC KEY`) or base64 of its 32 raw bytes."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped.encode())
        except ValueError as exc:
            raise PackageKeyError(f"not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise PackageKeyError(f"a {type(key).__name__}, not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(stripped, validate=True)
    except binascii.Error:
        raise PackageKeyError("neither a PEM public key nor base64") from None
    if len(raw) != 32:
        raise PackageKeyError(f"base64 of {len(raw)} bytes; an Ed25519 public key has 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_private_key(path: Path, private_key: Ed25519PrivateKey) -> None:
    """The key as unencrypted PKCS#8 PEM in a new file readable by its owner only (0600); an
    existing file is never overwritten (it may be the only copy of another key)."""
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The publisher's Ed25519 private key from a PEM file (as `models keygen` writes it)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PackageKeyError(f"{path}: cannot read the key ({exc.strerror or exc})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PackageKeyError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageKeyError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


@dataclass(frozen=True, slots=True)
class TrustedKey:
    label: str
    key_id: str
    public_key: Ed25519PublicKey

    def describe(self) -> str:
        return self.key_id if self.label == self.key_id else f"{self.label} ({self.key_id})"


class TrustedKeys:
    """The public keys whose signatures this appliance accepts, by key id."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._by_id = {key.key_id: key for key in keys}

    @classmethod
    def parse(cls, entries: Mapping[str, str]) -> TrustedKeys:
        """From config `trusted_keys` (label or key id -> key text); a bad entry names its label."""
        keys = []
        for label, text in entries.items():
            try:
                public_key = parse_public_key(text)
            except PackageKeyError as exc:
                raise PackageKeyError(f"trusted key {label!r}: {exc}") from None
            fingerprint = key_id(public_key)
            if re.fullmatch(KEY_ID_PATTERN, label) and label != fingerprint:
                raise PackageKeyError(
                    f"trusted key {label!r} is labelled like a key id, but the key's id is "
                    f"{fingerprint}"
                )
            keys.append(TrustedKey(label, fingerprint, public_key))
        return cls(keys)

    def get(self, key_id: str) -> TrustedKey | None:
        return self._by_id.get(key_id)

    def verifying(self, data: bytes, signature: bytes) -> TrustedKey | None:
        """The trusted key that made `signature` over `data`, if any."""
        for key in self._by_id.values():
            try:
                key.public_key.verify(signature, data)
            except InvalidSignature:
                continue
            return key
        return None

    def describe(self) -> str:
        if not self._by_id:
            return "none (add model_packages.trusted_keys to the config)"
        return ", ".join(key.describe() for key in self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)


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


def describe_onnx_input(path: Path, task: Task) -> InputSpec:
    """The first graph input of an ONNX file as an InputSpec (layout derived for detectors the way
    the session does: 3 channels second -> nchw, last -> nhwc)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... (no common base)
        raise ValueError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise ValueError(f"{path}: the model has no input")
    tensor = inputs[0].type.tensor_type
    dtype = _ONNX_DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise ValueError(f"{path}: input element type {tensor.elem_type} is not supported")
    shape = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in tensor.shape.dim
    ]
    if not shape:
        raise ValueError(f"{path}: the model's input has no shape")
    layout: Literal["nchw", "nhwc"] | None = None
    if task == "detector":
        if len(shape) != 4 or dtype not in _IMAGE_DTYPES:
            raise ValueError(
                f"{path}: input {shape} {dtype} is not an image ([1, 3, H, W] or [1, H, W, 3], "
                "float32, float16 or uint8)"
            )
        layout = "nhwc" if shape[1] != 3 and shape[3] == 3 else "nchw"
    return InputSpec(shape=shape, dtype=dtype, layout=layout)


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


def parse_labels(source: Path, data: bytes) -> tuple[str, ...]:
    """Class names, one a line, read the way the detector reads a labels file: trailing blank
    lines are ignored, a blank line inside is an error (it would shift every later class id)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PackageError(
            source, "the labels file is not UTF-8 text", cause="bad_manifest"
        ) from None
    lines = [line.strip() for line in text.rstrip().splitlines()]
    if not lines:
        raise PackageError(source, "the labels file is empty", cause="bad_manifest")
    for number, line in enumerate(lines, start=1):
        if not line:
            raise PackageError(
                source, f"line {number} of the labels file is blank", cause="bad_manifest"
            )
    return tuple(lines)


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
