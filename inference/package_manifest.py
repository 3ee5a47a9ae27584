"""Owns the model package manifest: the format's version, member names and limits, the strict
pydantic models of `manifest.json`, `PackageError`, and the two things a manifest describes of its
files: the labels file's lines and the ONNX model's input.

The signing keys are `inference/package_keys.py`'s; building, reading and verifying a package
archive are `inference/packages.py`'s (docs/model-packages.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from config.names import NAME_PATTERN, VERSION_PATTERN
from inference.package_keys import KEY_ID_PATTERN
from inference.session import ModelError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
LABELS_FILE = "labels.txt"
MAX_FILE_BYTES = 4 * 1024**3
MAX_FILES = 16

FILE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"
# Version folders share NAME/ with the pointer file, so a version may not be called like it.
RESERVED_VERSIONS = frozenset({"active.json"})

Task = Literal["detector", "anomaly"]
Dtype = Literal["float32", "float16", "float64", "uint8", "int64"]
# onnx.TensorProto's element types (fixed by the ONNX spec), written out so that importing this
# module does not import onnx (seconds, for CLI commands that never read a model).
_ONNX_DTYPES: dict[int, Dtype] = {
    1: "float32",  # FLOAT
    10: "float16",  # FLOAT16
    11: "float64",  # DOUBLE
    2: "uint8",  # UINT8
    7: "int64",  # INT64
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


# -- what the manifest describes of its files ------------------------------------------------------


def describe_onnx_input(path: Path, task: Task) -> InputSpec:
    """The first graph input of an ONNX file as an InputSpec (layout derived for detectors the way
    the session does: 3 channels second -> nchw, last -> nhwc)."""
    import onnx

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
