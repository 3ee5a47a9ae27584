"""The darknet (.cfg + .weights + .names) to ONNX converter: YOLOv3/v4-tiny style graphs, raw heads.

The produced graph takes `images` ([1, 3, H, W] float32, RGB scaled to 0..1) and has one output
per [yolo] layer, `yolo_0`, `yolo_1`, ... in cfg order: the raw tensor that feeds that layer
([1, A*(5+C), h, w], no sigmoid, no decoding). How to decode the heads (masked anchors in input
pixels, scale_x_y, new_coords), how to preprocess, the labels and the sources' sha256 travel in
the model's metadata_props, so the detector adapter needs nothing but the ONNX file.

The numerics follow OpenCV's darknet importer (cv2.dnn.readNetFromDarknet), which the tests use
as the reference: batch norm is folded into the convolution with eps 1e-6 (darknet's CPU path
uses the same .000001f), and a maxpool of size k pads k-1 in total, floor half before and the
rest after (so size=2 stride=1 pads (0, 0, 1, 1) and keeps the grid size).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from inference.session import ModelError

log = logging.getLogger(__name__)

OPSET = 13
# IR version 7 is the one that goes with opset 13. Pinned rather than taken from the installed
# onnx package so that the same inputs serialise to the same bytes across onnx upgrades (the
# built-in model's sha256 is checked).
IR_VERSION = 7
BN_EPS = 1e-6
INPUT_NAME = "images"
PRODUCER = "appliance-darknet"


class DarknetError(ModelError):
    """A darknet cfg, weights or names file that cannot be converted. Permanent: fix the files.

    `path` is the file at fault; `line` (1-based, in a cfg) where in it, when known.
    """

    def __init__(self, message: str, *, path: Path, line: int | None = None) -> None:
        super().__init__(path, message if line is None else f"line {line}: {message}")
        self.line = line


@dataclass
class Section:
    """One `[kind]` block of a cfg: its options (later repeats win, as in OpenCV) and its line."""

    kind: str
    line: int
    options: dict[str, str] = field(default_factory=dict)
    option_lines: dict[str, int] = field(default_factory=dict)


def parse_cfg(text: str, path: Path) -> list[Section]:
    """The sections of a cfg in order; the first must be [net] (or [network])."""
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        # Darknet drops every whitespace character of a line before reading it.
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            match = re.fullmatch(r"\[([A-Za-z_][A-Za-z0-9_]*)\]", line)
            if match is None:
                raise DarknetError(
                    f"malformed section header {raw.strip()!r}", path=path, line=number
                )
            sections.append(Section(match.group(1).lower(), number))
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or not value:
            raise DarknetError(
                f"expected `key=value` or `[section]`, got {raw.strip()!r}", path=path, line=number
            )
        if not sections:
            raise DarknetError(f"option {key!r} comes before any [section]", path=path, line=number)
        section = sections[-1]
        if key in section.options and section.options[key] != value:
            # Darknet itself reads the first occurrence, OpenCV the last; we follow OpenCV (the
            # reference the tests check against) and say so, since the two can disagree.
            log.warning(
                "%s:%d: [%s] repeats %r (%r, then %r); using the last, as OpenCV does",
                path,
                number,
                section.kind,
                key,
                section.options[key],
                value,
            )
        section.options[key] = value
        section.option_lines[key] = number
    if not sections:
        raise DarknetError("no [net] section: this is not a darknet cfg", path=path)
    if sections[0].kind not in ("net", "network"):
        raise DarknetError(
            f"the first section must be [net], got [{sections[0].kind}]",
            path=path,
            line=sections[0].line,
        )
    return sections


class _Options:
    """Typed access to one section's options, with errors that name the section and the line."""

    def __init__(self, section: Section, path: Path) -> None:
        self.section = section
        self.path = path

    def error(self, message: str, key: str | None = None) -> DarknetError:
        line = self.section.option_lines.get(key, self.section.line) if key else self.section.line
        return DarknetError(f"[{self.section.kind}] {message}", path=self.path, line=line)

    def has(self, key: str) -> bool:
        return key in self.section.options

    def _raw(self, key: str) -> str | None:
        return self.section.options.get(key)

    def get_int(self, key: str, default: int | None = None) -> int:
        raw = self._raw(key)
        if raw is None:
            if default is None:
                raise self.error(f"needs `{key}`")
            return default
        try:
            return int(raw)
        except ValueError:
            raise self.error(f"`{key}` must be an integer, got {raw!r}", key) from None

    def get_float(self, key: str, default: float) -> float:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            return float(raw)
        except ValueError:
            raise self.error(f"`{key}` must be a number, got {raw!r}", key) from None

    def get_str(self, key: str, default: str) -> str:
        raw = self._raw(key)
        return default if raw is None else raw

    def ints(self, key: str) -> list[int] | None:
        raw = self._raw(key)
        if raw is None:
            return None
        try:
            return [int(part) for part in raw.split(",") if part]
        except ValueError:
            raise self.error(
                f"`{key}` must be integers separated by commas, got {raw!r}", key
            ) from None

    def floats(self, key: str) -> list[float] | None:
        raw = self._raw(key)
        if raw is None:
            return None
        try:
            return [float(part) for part in raw.split(",") if part]
        except ValueError:
            raise self.error(
                f"`{key}` must be numbers separated by commas, got {raw!r}", key
            ) from None

    def positive(self, key: str, default: int | None = None) -> int:
        value = self.get_int(key, default)
        if value <= 0:
            raise self.error(f"`{key}` must be positive, got {value}", key)
        return value

    def reject(self, keys: dict[str, str]) -> None:
        """Fail on options that change inference in ways this converter does not implement.

        `keys` maps each option to its neutral value (the one that is harmless if written out).
        """
        for key, neutral in keys.items():
            value = self.section.options.get(key)
            if value is not None and value != neutral:
                raise self.error(f"`{key}={value}` is not supported by this converter", key)


@dataclass(frozen=True)
class _Tensor:
    """A layer's output in the graph: its tensor name and CHW shape."""

    name: str
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class _ConvParams:
    """Where one convolution's parameters go; filled from the weights file after the graph pass."""

    filters: int
    in_per_group: int
    size: int
    batch_normalize: bool
    weight_name: str
    bias_name: str

    @property
    def count(self) -> int:
        per_filter = 4 if self.batch_normalize else 1
        return self.filters * per_filter + self.filters * self.in_per_group * self.size**2


@dataclass(frozen=True)
class YoloHead:
    """One [yolo] layer: the output that feeds it and how to decode that output."""

    output: str
    anchors: tuple[tuple[float, float], ...]
    classes: int
    scale_x_y: float
    new_coords: int

    def as_dict(self) -> dict[str, object]:
        return {
            "output": self.output,
            "anchors": [[w, h] for w, h in self.anchors],
            "scale_x_y": self.scale_x_y,
            "new_coords": self.new_coords,
        }


ACTIVATIONS = ("linear", "leaky", "mish", "logistic", "relu", "swish")


class _GraphBuilder:
    """Turns the cfg's sections into ONNX nodes, one darknet layer at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.layers: list[_Tensor] = []
        self.convs: list[_ConvParams] = []
        self.heads: list[YoloHead] = []
        self.head_inputs: list[_Tensor] = []

    def const(self, name: str, values: list[int] | list[float], dtype: type[np.generic]) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def activation(self, opts: _Options, index: int, x: str) -> str:
        kind = opts.get_str("activation", "linear")
        prefix = f"l{index}_{kind}"
        if kind == "linear":
            return x
        if kind == "leaky":
            return self.node("LeakyRelu", [x], prefix, alpha=0.1)
        if kind == "relu":
            return self.node("Relu", [x], prefix)
        if kind == "logistic":
            return self.node("Sigmoid", [x], prefix)
        if kind == "swish":
            gate = self.node("Sigmoid", [x], f"{prefix}_sigmoid")
            return self.node("Mul", [x, gate], prefix)
        if kind == "mish":
            # Mish(x) = x * tanh(softplus(x)); opset 13 has no Mish operator (it came in 18).
            soft = self.node("Softplus", [x], f"{prefix}_softplus")
            tanh = self.node("Tanh", [soft], f"{prefix}_tanh")
            return self.node("Mul", [x, tanh], prefix)
        raise opts.error(
            f"activation {kind!r} is not supported (supported: {', '.join(ACTIVATIONS)})",
            "activation",
        )

    def source(self, opts: _Options, index: int, ref: int, key: str) -> int:
        """The absolute layer index a route/shortcut reference points at (negative = relative)."""
        target = index + ref if ref < 0 else ref
        if not 0 <= target < index:
            raise opts.error(
                f"`{key}` refers to layer {ref} (absolute {target}); layer {index} can only use "
                f"layers 0..{index - 1}",
                key,
            )
        return target

    def convolutional(self, opts: _Options, index: int, x: _Tensor) -> _Tensor:
        opts.reject(
            {
                "dilation": "1",
                "flipped": "0",
                "binary": "0",
                "xnor": "0",
                "antialiasing": "0",
                "share_index": "",
                "deform": "0",
                "stride_x": opts.section.options.get("stride", "1"),
                "stride_y": opts.section.options.get("stride", "1"),
            }
        )
        filters = opts.positive("filters")
        size = opts.positive("size")
        stride = opts.positive("stride", 1)
        groups = opts.positive("groups", 1)
        padding = size // 2 if opts.get_int("pad", 0) else opts.get_int("padding", 0)
        if padding < 0:
            raise opts.error(f"`padding` must not be negative, got {padding}", "padding")
        batch_normalize = opts.get_int("batch_normalize", 0) != 0
        if x.channels % groups or filters % groups:
            raise opts.error(
                f"`groups={groups}` must divide the {x.channels} input channels and the "
                f"{filters} filters",
                "groups",
            )
        height = (x.height + 2 * padding - size) // stride + 1
        width = (x.width + 2 * padding - size) // stride + 1
        if height <= 0 or width <= 0:
            raise opts.error(f"the {x.height}x{x.width} input is too small for size={size}")
        params = _ConvParams(
            filters=filters,
            in_per_group=x.channels // groups,
            size=size,
            batch_normalize=batch_normalize,
            weight_name=f"l{index}_conv.weight",
            bias_name=f"l{index}_conv.bias",
        )
        self.convs.append(params)
        out = self.node(
            "Conv",
            [x.name, params.weight_name, params.bias_name],
            f"l{index}_conv",
            kernel_shape=[size, size],
            strides=[stride, stride],
            pads=[padding] * 4,
            group=groups,
        )
        out = self.activation(opts, index, out)
        return _Tensor(out, filters, height, width)

    def maxpool(self, opts: _Options, index: int, x: _Tensor) -> _Tensor:
        opts.reject({"maxpool_depth": "0", "antialiasing": "0", "stride_x": "", "stride_y": ""})
        # Darknet's defaults: stride 1, size = stride, padding = size - 1 (all of it "same"-like).
        stride = opts.positive("stride", 1)
        size = opts.positive("size", stride)
        padding = opts.get_int("padding", size - 1)
        if not 0 <= padding < 2 * size:
            raise opts.error(
                f"`padding` must be within 0..{2 * size - 1}, got {padding}", "padding"
            )
        before, after = padding // 2, padding - padding // 2
        height = (x.height + padding - size) // stride + 1
        width = (x.width + padding - size) // stride + 1
        if height <= 0 or width <= 0:
            raise opts.error(f"the {x.height}x{x.width} input is too small for size={size}")
        out = self.node(
            "MaxPool",
            [x.name],
            f"l{index}_maxpool",
            kernel_shape=[size, size],
            strides=[stride, stride],
            pads=[before, before, after, after],
        )
        return _Tensor(out, x.channels, height, width)

    def upsample(self, opts: _Options, index: int, x: _Tensor) -> _Tensor:
        opts.reject({"scale": "1"})
        stride = opts.get_int("stride", 2)
        if stride < 1:
            raise opts.error(
                f"`stride` must be a positive upsampling factor, got {stride}", "stride"
            )
        scales = self.const(f"l{index}_upsample.scales", [1.0, 1.0, stride, stride], np.float32)
        # asymmetric + floor makes output pixel (y, x) copy input (y // s, x // s), like darknet.
        out = self.node(
            "Resize",
            [x.name, "", scales],
            f"l{index}_upsample",
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )
        return _Tensor(out, x.channels, x.height * stride, x.width * stride)

    def route(self, opts: _Options, index: int) -> _Tensor:
        refs = opts.ints("layers")
        if not refs:
            raise opts.error("needs `layers`")
        groups = opts.positive("groups", 1)
        group_id = opts.get_int("group_id", 0)
        if not 0 <= group_id < groups:
            raise opts.error(
                f"`group_id` must be within 0..{groups - 1}, got {group_id}", "group_id"
            )
        parts: list[_Tensor] = []
        for ref in refs:
            src = self.layers[self.source(opts, index, ref, "layers")]
            if groups > 1:
                # Like darknet: each input contributes its group_id-th slice of channels.
                if src.channels % groups:
                    raise opts.error(
                        f"`groups={groups}` does not divide the {src.channels} channels of "
                        f"layer {ref}",
                        "groups",
                    )
                step = src.channels // groups
                name = f"l{index}_route_slice{len(parts)}"
                starts = self.const(f"{name}.starts", [group_id * step], np.int64)
                ends = self.const(f"{name}.ends", [(group_id + 1) * step], np.int64)
                axes = self.const(f"{name}.axes", [1], np.int64)
                src = _Tensor(
                    self.node("Slice", [src.name, starts, ends, axes], name),
                    step,
                    src.height,
                    src.width,
                )
            parts.append(src)
        first = parts[0]
        for part, ref in zip(parts, refs, strict=True):
            if (part.height, part.width) != (first.height, first.width):
                raise opts.error(
                    f"cannot join layer {refs[0]} ({first.height}x{first.width}) with layer "
                    f"{ref} ({part.height}x{part.width}): grid sizes differ",
                    "layers",
                )
        if len(parts) == 1:
            return first
        out = self.node("Concat", [p.name for p in parts], f"l{index}_route", axis=1)
        return _Tensor(out, sum(p.channels for p in parts), first.height, first.width)

    def shortcut(self, opts: _Options, index: int, x: _Tensor) -> _Tensor:
        opts.reject({"weights_type": "none", "weights_normalization": "none"})
        for key in ("alpha", "beta"):
            if opts.has(key):
                raise opts.error(f"`{key}` is not supported by this converter", key)
        refs = opts.ints("from")
        if refs is None or len(refs) != 1:
            raise opts.error("needs `from` with exactly one layer")
        other = self.layers[self.source(opts, index, refs[0], "from")]
        if (other.channels, other.height, other.width) != (x.channels, x.height, x.width):
            raise opts.error(
                f"cannot add layer {refs[0]} ({other.channels}x{other.height}x{other.width}) to "
                f"the previous layer ({x.channels}x{x.height}x{x.width}): shapes differ",
                "from",
            )
        out = self.node("Add", [x.name, other.name], f"l{index}_shortcut")
        return _Tensor(self.activation(opts, index, out), x.channels, x.height, x.width)

    def yolo(self, opts: _Options, index: int, x: _Tensor) -> _Tensor:
        classes = opts.positive("classes")
        anchors = opts.floats("anchors")
        if not anchors or len(anchors) % 2:
            raise opts.error("needs `anchors` as pairs of width, height", "anchors")
        num = opts.positive("num", len(anchors) // 2)
        if num * 2 != len(anchors):
            raise opts.error(f"`num={num}` but `anchors` has {len(anchors) // 2} pairs", "anchors")
        mask = opts.ints("mask")
        if mask is None:
            mask = list(range(num))
        if not mask or any(not 0 <= m < num for m in mask):
            raise opts.error(f"`mask` must pick anchors within 0..{num - 1}, got {mask}", "mask")
        new_coords = opts.get_int("new_coords", 0)
        if new_coords not in (0, 1):
            raise opts.error(f"`new_coords` must be 0 or 1, got {new_coords}", "new_coords")
        expected = len(mask) * (5 + classes)
        if x.channels != expected:
            raise opts.error(
                f"its input has {x.channels} channels but {len(mask)} anchors x (5 + {classes} "
                f"classes) needs {expected}: check `filters` of the layer before"
            )
        output = f"yolo_{len(self.heads)}"
        self.node("Identity", [x.name], output)
        self.heads.append(
            YoloHead(
                output=output,
                anchors=tuple((anchors[2 * m], anchors[2 * m + 1]) for m in mask),
                classes=classes,
                scale_x_y=opts.get_float("scale_x_y", 1.0),
                new_coords=new_coords,
            )
        )
        self.head_inputs.append(x)
        # The layer passes its input through, so a later route or shortcut may refer to it.
        return x

    def layer(self, section: Section, index: int, x: _Tensor) -> _Tensor:
        opts = _Options(section, self.path)
        builders: dict[str, Callable[[], _Tensor]] = {
            "convolutional": lambda: self.convolutional(opts, index, x),
            "conv": lambda: self.convolutional(opts, index, x),
            "maxpool": lambda: self.maxpool(opts, index, x),
            "max": lambda: self.maxpool(opts, index, x),
            "upsample": lambda: self.upsample(opts, index, x),
            "route": lambda: self.route(opts, index),
            "shortcut": lambda: self.shortcut(opts, index, x),
            "yolo": lambda: self.yolo(opts, index, x),
        }
        build = builders.get(section.kind)
        if build is None:
            raise DarknetError(
                f"layer {index}: section [{section.kind}] is not supported (supported: "
                "convolutional, maxpool, upsample, route, shortcut, yolo)",
                path=self.path,
                line=section.line,
            )
        if section.kind not in ("convolutional", "conv", "shortcut"):
            opts.reject({"activation": "linear"})
        return build()


def _read_weights(data: bytes, path: Path) -> npt.NDArray[np.float32]:
    """The float32 parameters after the header (major, minor, revision, seen)."""
    if len(data) < 12:
        raise DarknetError(f"weights file is {len(data)} bytes, too short for a header", path=path)
    major, minor, _revision = (int(v) for v in np.frombuffer(data, dtype="<i4", count=3))
    # `seen` grew from int32 to int64 in format 0.2; darknet also guards against byte-swapped or
    # garbage versions (>= 1000) by falling back to the old size.
    seen_size = 8 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else 4
    header = 12 + seen_size
    if major > 1000 or minor > 1000:
        raise DarknetError(
            f"weights file version {major}.{minor} stores transposed weights; not supported",
            path=path,
        )
    body = len(data) - header
    if body < 0 or body % 4:
        raise DarknetError(
            f"weights file is {len(data)} bytes: after the {header}-byte header that is not a "
            "whole number of float32 values",
            path=path,
        )
    return np.frombuffer(data, dtype="<f4", offset=header)


def _fill_conv(
    params: _ConvParams, floats: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Weights and bias for one convolution, batch norm folded in (in float64, then float32)."""
    f = params.filters
    blocks = 4 if params.batch_normalize else 1
    head = floats[: f * blocks].astype(np.float64).reshape(blocks, f)
    shape = (f, params.in_per_group, params.size, params.size)
    weight = floats[f * blocks : params.count].astype(np.float64).reshape(shape)
    if not params.batch_normalize:
        bias = head[0]
    else:
        beta, gamma, mean, var = head
        scale = gamma / np.sqrt(var + BN_EPS)
        weight = weight * scale[:, None, None, None]
        bias = beta - mean * scale
    return weight.astype(np.float32), bias.astype(np.float32)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_labels(names_path: Path) -> list[str]:
    """Class names, one a line; blank lines (such as a trailing one) are ignored."""
    try:
        text = names_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DarknetError(f"names file is not UTF-8 text: {exc}", path=names_path) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def convert_darknet(
    cfg_path: Path | str,
    weights_path: Path | str,
    names_path: Path | str,
    *,
    name: str,
    version: str,
) -> onnx.ModelProto:
    """Convert a darknet model to a checked ONNX model (see the module docstring for its shape)."""
    cfg_path, weights_path, names_path = Path(cfg_path), Path(weights_path), Path(names_path)
    cfg_bytes = cfg_path.read_bytes()
    try:
        cfg_text = cfg_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DarknetError(f"cfg is not UTF-8 text: {exc}", path=cfg_path) from None
    sections = parse_cfg(cfg_text, cfg_path)
    net = _Options(sections[0], cfg_path)
    width = net.positive("width")
    height = net.positive("height")
    channels = net.positive("channels", 3)
    if channels != 3:
        raise net.error(f"`channels={channels}`: only 3-channel (RGB) models are supported")
    if len(sections) == 1:
        raise DarknetError("the cfg has no layers after [net]", path=cfg_path)

    builder = _GraphBuilder(cfg_path)
    x = _Tensor(INPUT_NAME, channels, height, width)
    for index, section in enumerate(sections[1:]):
        x = builder.layer(section, index, x)
        builder.layers.append(x)
    if not builder.heads:
        raise DarknetError(
            "the cfg has no [yolo] layer, so the model has no outputs", path=cfg_path
        )
    classes = {head.classes for head in builder.heads}
    if len(classes) != 1:
        raise DarknetError(
            f"the [yolo] layers disagree on `classes`: {sorted(classes)}", path=cfg_path
        )
    (n_classes,) = classes

    labels = read_labels(names_path)
    if len(labels) != n_classes:
        raise DarknetError(
            f"names file has {len(labels)} labels, the cfg's [yolo] layers have {n_classes} classes",
            path=names_path,
        )

    weights_bytes = weights_path.read_bytes()
    floats = _read_weights(weights_bytes, weights_path)
    needed = sum(p.count for p in builder.convs)
    if floats.size != needed:
        more = "too short" if floats.size < needed else "too long"
        raise DarknetError(
            f"weights file has {floats.size} floats, the cfg needs {needed} ({more}: is it the "
            "weights for this cfg?)",
            path=weights_path,
        )
    offset = 0
    for params in builder.convs:
        weight, bias = _fill_conv(params, floats[offset : offset + params.count])
        offset += params.count
        builder.initializers.append(numpy_helper.from_array(weight, params.weight_name))
        builder.initializers.append(numpy_helper.from_array(bias, params.bias_name))

    graph = helper.make_graph(
        builder.nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, height, width])],
        [
            helper.make_tensor_value_info(
                head.output,
                TensorProto.FLOAT,
                [1, len(head.anchors) * (5 + head.classes), tensor.height, tensor.width],
            )
            for head, tensor in zip(builder.heads, builder.head_inputs, strict=True)
        ],
        initializer=builder.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=f"{name} {version}, converted from darknet",
    )
    model.ir_version = IR_VERSION
    metadata = {
        "appliance.layout": "darknet",
        "appliance.darknet.heads": json.dumps([head.as_dict() for head in builder.heads]),
        "appliance.input": json.dumps(
            {
                "width": width,
                "height": height,
                "format": "rgb",
                "scale": 1 / 255,
                "resize": "letterbox",
            }
        ),
        "appliance.labels": json.dumps(labels),
        "appliance.name": name,
        "appliance.version": version,
        "appliance.source_sha256": json.dumps(
            {
                "cfg": hashlib.sha256(cfg_bytes).hexdigest(),
                "weights": hashlib.sha256(weights_bytes).hexdigest(),
                "names": sha256_file(names_path),
            }
        ),
    }
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def save_model(model: onnx.ModelProto, path: Path | str) -> str:
    """Write `model` atomically (temp file, fsync, rename, fsync the folder); its sha256."""
    path = Path(path)
    data = model.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600; a model prepared by root at image build time must stay
            # readable by the unprivileged user the appliance runs as.
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return hashlib.sha256(data).hexdigest()
