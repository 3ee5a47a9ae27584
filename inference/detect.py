"""Object detection with ONNX models: preprocessing (letterbox), the output-layout adapters (YOLO
darknet-style heads, YOLOv5, YOLOv8/v11, SSD), class-aware NMS, and `OnnxDetector`, the Detector
the pipeline runs."""

from __future__ import annotations

import ast
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, Self

import cv2
import numpy as np
import numpy.typing as npt

from config.cameras import DetectorModel
from inference.detections import Detection
from inference.session import (
    InferenceError,
    LatencyRecorder,
    LatencyStats,
    ModelError,
    ModelSession,
    TensorInfo,
    fixed,
)

if TYPE_CHECKING:
    from inference.packages import PackageResolver

log = logging.getLogger(__name__)

Layout = Literal["darknet", "yolov5", "yolov8", "ssd"]
LAYOUTS: tuple[Layout, ...] = ("darknet", "yolov5", "yolov8", "ssd")
EXPECTED_LAYOUTS = (
    "darknet (rank-4 heads [1, A*(5+C), h, w] described by metadata 'appliance.darknet.heads'), "
    "yolov5 (one output [1, N, 5+C]), yolov8/v11 (one output [1, 4+C, N] or [1, N, 4+C]), "
    "ssd (boxes [1, N, 4], scores [1, N], classes [1, N], count [1])"
)

# Darknet's coco.names spelling (the built-in model's labels), so that a camera's class filter
# means the same with the built-in detector and with an 80-class model that ships no labels.
COCO_LABELS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

PAD_VALUE = 114  # the grey YOLO letterboxes with; what the models saw in training
MAX_DETECTIONS = 300
# Candidates entering NMS, best first: bounds its cost when a broken or mis-thresholded model
# scores everything high (greedy NMS is quadratic in the worst case).
MAX_NMS_CANDIDATES = 3000
# exp() of a raw darknet width beyond this is a box thousands of times the anchor: garbage, and
# float32 would overflow to inf (and IoU to NaN) a little further on.
_MAX_EXP = 30.0

FloatArray = npt.NDArray[np.float32]


# -- preprocessing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Geometry:
    """How a frame was placed in the network input: network = frame * scale + pad, per axis."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float


def _resize_into(
    image_bgr: npt.NDArray[np.uint8], width: int, height: int, resize: str
) -> tuple[npt.NDArray[np.uint8], Geometry]:
    """The frame resized into width x height (uint8 BGR) and where it went."""
    h, w = image_bgr.shape[:2]
    if resize == "stretch":
        out = cv2.resize(image_bgr, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.asarray(out, dtype=np.uint8), Geometry(width / w, height / h, 0.0, 0.0)
    scale = min(width / w, height / h)
    new_w = min(width, max(1, round(w * scale)))
    new_h = min(height, max(1, round(h * scale)))
    resized: npt.NDArray[Any] = image_bgr
    if (new_w, new_h) != (w, h):
        resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left = (width - new_w) // 2
    top = (height - new_h) // 2
    out = cv2.copyMakeBorder(
        resized,
        top,
        height - new_h - top,
        left,
        width - new_w - left,
        cv2.BORDER_CONSTANT,
        value=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    # The scales actually applied after rounding the size, so the inverse mapping is exact.
    return np.asarray(out, dtype=np.uint8), Geometry(new_w / w, new_h / h, float(left), float(top))


def letterbox(
    image_bgr: npt.NDArray[np.uint8], width: int, height: int
) -> tuple[FloatArray, float, float, float]:
    """The frame fitted into width x height, aspect kept, padded with grey 114, as a float32
    [1, 3, height, width] RGB tensor in 0..1; with the scale and the left and top padding
    (network pixel = frame pixel * scale + pad)."""
    _check_image(image_bgr)
    if width < 1 or height < 1:
        raise ValueError(f"letterbox size must be positive, got {width}x{height}")
    placed, geometry = _resize_into(image_bgr, width, height, "letterbox")
    rgb = cv2.cvtColor(placed, cv2.COLOR_BGR2RGB)
    tensor = (rgb.astype(np.float32) * np.float32(1 / 255)).transpose(2, 0, 1)[None]
    h, w = image_bgr.shape[:2]
    scale = min(width / w, height / h)
    return np.ascontiguousarray(tensor), scale, geometry.pad_x, geometry.pad_y


def unletterbox(
    boxes_xyxy: npt.ArrayLike,
    scale: float | tuple[float, float],
    pad_x: float,
    pad_y: float,
    frame_width: int,
    frame_height: int,
) -> npt.NDArray[np.float64]:
    """Boxes in network-input pixels back to frame pixels, clipped to the frame.

    `scale` is one factor (letterbox) or (scale_x, scale_y)."""
    sx, sy = (scale, scale) if isinstance(scale, int | float) else scale
    boxes = np.array(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - pad_x) / sx).clip(0, frame_width)
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pad_y) / sy).clip(0, frame_height)
    return boxes


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected a BGR uint8 image (H x W x 3 numpy array), got {kind}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected a BGR image of shape H x W x 3, got shape {image.shape}")


# -- NMS ----------------------------------------------------------------------------------------


def nms(
    boxes_xyxy: npt.ArrayLike,
    scores: npt.ArrayLike,
    iou_threshold: float,
    class_ids: npt.ArrayLike | None = None,
) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    A box is dropped when it overlaps a better kept box by more than `iou_threshold` (IoU).
    With `class_ids`, only boxes of the same class suppress each other.
    """
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(b) != len(s):
        raise ValueError(f"nms: {len(b)} boxes but {len(s)} scores")
    if len(s) == 0:
        return np.empty(0, dtype=np.intp)
    if class_ids is not None:
        c = np.asarray(class_ids, dtype=np.float64).reshape(-1)
        if len(c) != len(s):
            raise ValueError(f"nms: {len(b)} boxes but {len(c)} class ids")
        # Move each class to its own region of the plane: boxes of different classes can then
        # never overlap, and one pass does every class.
        low = b.min()
        span = b.max() - low + 1.0
        b = (b - low) + (c * span)[:, None]
    x1, y1, x2, y2 = b.T
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        w = (np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest])).clip(0)
        h = (np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])).clip(0)
        inter = w * h
        union = areas[best] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


# -- adapters -------------------------------------------------------------------------------------


class Decoded(NamedTuple):
    """Candidates from one run: boxes xyxy in network-input pixels, scores, class ids."""

    boxes: FloatArray
    scores: FloatArray
    class_ids: npt.NDArray[np.int64]


def _empty() -> Decoded:
    return Decoded(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def _sigmoid(x: FloatArray) -> FloatArray:
    # The tanh form never overflows, unlike 1 / (1 + exp(-x)) for very negative logits.
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float32)


def _cxcywh_to_xyxy(cx: FloatArray, cy: FloatArray, w: FloatArray, h: FloatArray) -> FloatArray:
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1).astype(np.float32)


def _best_class(
    class_scores: FloatArray, factor: FloatArray | None, threshold: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64], FloatArray]:
    """Per row the best class and its score (times `factor`, e.g. objectness); rows at or above
    `threshold` only: (row indices, class ids, scores)."""
    ids = class_scores.argmax(axis=1)
    best = np.take_along_axis(class_scores, ids[:, None], axis=1)[:, 0]
    if factor is not None:
        best = best * factor
    rows = np.flatnonzero(best >= threshold)
    return rows, ids[rows].astype(np.int64), best[rows].astype(np.float32)


def _describe_outputs(outputs: Sequence[TensorInfo]) -> str:
    return "; ".join(o.describe() for o in outputs) or "none"


class Adapter(Protocol):
    """Turns a model's raw outputs into candidate boxes (before NMS)."""

    layout: Layout
    num_classes: int | None  # None when the outputs do not tell (SSD)

    def decode(
        self,
        outputs: Sequence[npt.NDArray[Any]],
        input_width: int,
        input_height: int,
        score_threshold: float,
    ) -> Decoded: ...


@dataclass(frozen=True, slots=True)
class DarknetHead:
    """How to decode one darknet [yolo] head (our converter writes these into the metadata)."""

    output: str
    anchors: tuple[tuple[float, float], ...]  # masked anchors, (w, h) in input pixels
    scale_x_y: float = 1.0
    new_coords: int = 0


def decode_darknet_head(
    raw: npt.NDArray[Any],
    head: DarknetHead,
    input_width: int,
    input_height: int,
    min_objectness: float = 0.0,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Decode one raw head [1, A*(5+C), h, w] as darknet's yolo_layer.c does.

    Returns, for every (anchor, row, column) in that order whose objectness is at least
    `min_objectness`: boxes xyxy in input pixels [n, 4], objectness [n] and per-class
    probabilities [n, C] (not yet multiplied by objectness). A class score is objectness times a
    probability of at most 1, so a caller with a score threshold passes it here and skips the
    class activations of the (usually 99%) cells that cannot reach it.
    With new_coords=0 the raw values are logits (x, y, objectness and classes go through a
    sigmoid, w and h through exp); with new_coords=1 the layer before already applied the
    logistic activation to everything, and w = (2 * tw)^2 * anchor.
    """
    x = np.asarray(raw, dtype=np.float32)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"head {head.output}: batch {x.shape[0]}, expected 1")
        x = x[0]
    anchors = len(head.anchors)
    if x.ndim != 3 or x.shape[0] % anchors or x.shape[0] // anchors < 6:
        raise ValueError(
            f"head {head.output}: shape {list(raw.shape)} is not [1, {anchors}*(5+C), h, w]"
        )
    channels, grid_h, grid_w = x.shape
    # [anchor, row, column, 5+C]: one row per cell, in the order the docstring promises.
    grid = x.reshape(anchors, channels // anchors, grid_h, grid_w).transpose(0, 2, 3, 1)
    cells: FloatArray = grid.reshape(-1, channels // anchors)
    obj = cells[:, 4] if head.new_coords else _sigmoid(cells[:, 4])
    keep = np.flatnonzero(obj >= min_objectness)
    cells, obj = cells[keep], obj[keep]
    anchor_index, cell_index = np.divmod(keep, grid_h * grid_w)
    rows, cols = np.divmod(cell_index, grid_w)
    tx, ty, tw, th = cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3]
    cls = cells[:, 5:]
    if not head.new_coords:
        tx, ty, cls = _sigmoid(tx), _sigmoid(ty), _sigmoid(cls)
    sxy = np.float32(head.scale_x_y)
    shift = np.float32((head.scale_x_y - 1.0) / 2.0)
    cx = (tx * sxy - shift + cols.astype(np.float32)) / grid_w * input_width
    cy = (ty * sxy - shift + rows.astype(np.float32)) / grid_h * input_height
    anchor = np.asarray(head.anchors, dtype=np.float32)[anchor_index]
    aw, ah = anchor[:, 0], anchor[:, 1]
    if head.new_coords:
        bw, bh = (2.0 * tw) ** 2 * aw, (2.0 * th) ** 2 * ah
    else:
        bw = np.exp(np.minimum(tw, _MAX_EXP)) * aw
        bh = np.exp(np.minimum(th, _MAX_EXP)) * ah
    boxes = _cxcywh_to_xyxy(cx, cy, bw, bh)
    return boxes, obj.astype(np.float32), np.asarray(cls, dtype=np.float32)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class DarknetAdapter:
    """YOLO darknet-style heads (v3-tiny, v4-tiny): raw outputs decoded with anchors from the
    model's metadata (`appliance.darknet.heads`)."""

    layout: Layout = "darknet"

    def __init__(
        self, path: Path, heads: Sequence[DarknetHead], indices: Sequence[int], num_classes: int
    ) -> None:
        self.path = path
        self.heads = tuple(heads)
        self.indices = tuple(indices)
        self.num_classes: int | None = num_classes

    @classmethod
    def from_session(cls, session: ModelSession) -> DarknetAdapter:
        path = session.path
        spec = session.metadata_json("appliance.darknet.heads")
        if spec is None:
            raise ModelError(
                path,
                "darknet layout needs the metadata 'appliance.darknet.heads' (anchors per output), "
                "which this model lacks; convert darknet models with `appliance models import`. "
                f"Its outputs: {_describe_outputs(session.outputs)}",
            )
        if not isinstance(spec, list) or not spec:
            raise ModelError(path, "metadata 'appliance.darknet.heads' must be a non-empty list")
        names = [o.name for o in session.outputs]
        heads: list[DarknetHead] = []
        indices: list[int] = []
        num_classes: int | None = None
        for number, entry in enumerate(spec):
            head = cls._parse_head(path, number, entry)
            if head.output not in names:
                raise ModelError(
                    path,
                    f"darknet head {number} names output {head.output!r}, which the model does "
                    f"not have (outputs: {names})",
                )
            info = session.outputs[names.index(head.output)]
            channels = fixed(info.shape[1]) if len(info.shape) == 4 else -1
            if len(info.shape) != 4 or fixed(info.shape[0]) not in (None, 1):
                raise ModelError(path, f"darknet head {info.describe()} is not [1, A*(5+C), h, w]")
            if channels is not None:
                anchors = len(head.anchors)
                if channels % anchors or channels // anchors < 6:
                    raise ModelError(
                        path,
                        f"darknet head {info.describe()} has {channels} channels, not "
                        f"{anchors} anchors x (5 + classes)",
                    )
                classes = channels // anchors - 5
                if num_classes is not None and classes != num_classes:
                    raise ModelError(
                        path,
                        f"darknet heads disagree on the class count ({num_classes} vs {classes})",
                    )
                num_classes = classes
            heads.append(head)
            indices.append(names.index(head.output))
        if num_classes is None:
            raise ModelError(path, "darknet heads have no fixed channel count: cannot tell classes")
        return cls(path, heads, indices, num_classes)

    @staticmethod
    def _parse_head(path: Path, number: int, entry: Any) -> DarknetHead:
        where = f"metadata 'appliance.darknet.heads'[{number}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("output"), str):
            raise ModelError(path, f"{where} must be an object with an `output` name")
        anchors = entry.get("anchors")
        if (
            not isinstance(anchors, list)
            or not anchors
            or not all(
                isinstance(a, list) and len(a) == 2 and all(_number(v) and v > 0 for v in a)
                for a in anchors
            )
        ):
            raise ModelError(path, f"{where}: `anchors` must be a list of [w, h] > 0 pairs")
        scale_x_y = entry.get("scale_x_y", 1.0)
        if not _number(scale_x_y) or scale_x_y <= 0:
            raise ModelError(path, f"{where}: `scale_x_y` must be a positive number")
        new_coords = entry.get("new_coords", 0)
        if new_coords not in (0, 1) or isinstance(new_coords, bool):
            raise ModelError(path, f"{where}: `new_coords` must be 0 or 1, got {new_coords!r}")
        return DarknetHead(
            output=entry["output"],
            anchors=tuple((float(w), float(h)) for w, h in anchors),
            scale_x_y=float(scale_x_y),
            new_coords=int(new_coords),
        )

    def decode(
        self,
        outputs: Sequence[npt.NDArray[Any]],
        input_width: int,
        input_height: int,
        score_threshold: float,
    ) -> Decoded:
        parts: list[Decoded] = []
        for head, index in zip(self.heads, self.indices, strict=True):
            raw = outputs[index]
            expected = len(head.anchors) * (5 + (self.num_classes or 0))
            if raw.ndim != 4 or raw.shape[0] != 1 or raw.shape[1] != expected:
                raise InferenceError(
                    self.path,
                    f"head {head.output} came back {list(raw.shape)}, expected "
                    f"[1, {expected}, h, w]",
                )
            boxes, obj, probs = decode_darknet_head(
                raw, head, input_width, input_height, min_objectness=score_threshold
            )
            rows, ids, scores = _best_class(probs, obj, score_threshold)
            parts.append(Decoded(boxes[rows], scores, ids))
        return Decoded(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))


class YoloV5Adapter:
    """One output [1, N, 5+C]: cx, cy, w, h (input pixels), objectness, class scores, all
    already activated; score = objectness * class score."""

    layout: Layout = "yolov5"

    def __init__(self, path: Path, index: int, num_classes: int) -> None:
        self.path = path
        self.index = index
        self.num_classes: int | None = num_classes

    @classmethod
    def from_session(cls, session: ModelSession, num_classes: int | None) -> YoloV5Adapter:
        index, info = _single_rank3_output(session, "yolov5", "[1, N, 5+C]")
        width = fixed(info.shape[2])
        if width is not None:
            if width < 6:
                raise ModelError(
                    session.path, f"yolov5 output {info.describe()} is not [1, N, 5+C]"
                )
            if num_classes is not None and width != 5 + num_classes:
                raise ModelError(
                    session.path,
                    f"yolov5 output {info.describe()} has 5+{width - 5} values a box but the "
                    f"labels name {num_classes} classes",
                )
            num_classes = width - 5
        if num_classes is None:
            raise ModelError(
                session.path, f"cannot tell the class count of {info.describe()}: give labels_file"
            )
        return cls(session.path, index, num_classes)

    def decode(
        self,
        outputs: Sequence[npt.NDArray[Any]],
        input_width: int,
        input_height: int,
        score_threshold: float,
    ) -> Decoded:
        out = np.asarray(outputs[self.index], dtype=np.float32)
        classes = self.num_classes or 0
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[2] != 5 + classes:
            raise InferenceError(
                self.path, f"output came back {list(out.shape)}, expected [1, N, {5 + classes}]"
            )
        rows_all = out[0]
        rows, ids, scores = _best_class(rows_all[:, 5:], rows_all[:, 4], score_threshold)
        kept = rows_all[rows]
        boxes = _cxcywh_to_xyxy(kept[:, 0], kept[:, 1], kept[:, 2], kept[:, 3])
        return Decoded(boxes, scores, ids)


class YoloV8Adapter:
    """One output [1, 4+C, N] (YOLOv8/v11 exports) or its transpose [1, N, 4+C]: cx, cy, w, h
    (input pixels) and class scores, no objectness."""

    layout: Layout = "yolov8"

    def __init__(self, path: Path, index: int, num_classes: int, transposed: bool) -> None:
        self.path = path
        self.index = index
        self.num_classes: int | None = num_classes
        self.transposed = transposed

    @classmethod
    def from_session(cls, session: ModelSession, num_classes: int | None) -> YoloV8Adapter:
        index, info = _single_rank3_output(session, "yolov8", "[1, 4+C, N] or [1, N, 4+C]")
        a, b = fixed(info.shape[1]), fixed(info.shape[2])
        if num_classes is not None:
            # Channels-first is what Ultralytics exports; it wins when both dims would fit.
            if a == 4 + num_classes:
                return cls(session.path, index, num_classes, transposed=False)
            if b == 4 + num_classes:
                return cls(session.path, index, num_classes, transposed=True)
            raise ModelError(
                session.path,
                f"yolov8 output {info.describe()} is neither [1, 4+C, N] nor [1, N, 4+C] for the "
                f"{num_classes} classes the labels name",
            )
        # Without labels: the box+class dimension is the smaller one (84 against 8400).
        if a is not None and (b is None or a <= b) and a >= 5:
            return cls(session.path, index, a - 4, transposed=False)
        if b is not None and (a is None or b < a) and b >= 5:
            return cls(session.path, index, b - 4, transposed=True)
        raise ModelError(
            session.path, f"cannot tell the class count of {info.describe()}: give labels_file"
        )

    def decode(
        self,
        outputs: Sequence[npt.NDArray[Any]],
        input_width: int,
        input_height: int,
        score_threshold: float,
    ) -> Decoded:
        out = np.asarray(outputs[self.index], dtype=np.float32)
        per_box = 4 + (self.num_classes or 0)
        axis = 2 if self.transposed else 1
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[axis] != per_box:
            shape = "[1, N, %d]" if self.transposed else "[1, %d, N]"
            raise InferenceError(
                self.path, f"output came back {list(out.shape)}, expected {shape % per_box}"
            )
        rows_all = out[0] if self.transposed else out[0].T
        rows, ids, scores = _best_class(rows_all[:, 4:], None, score_threshold)
        kept = rows_all[rows]
        boxes = _cxcywh_to_xyxy(kept[:, 0], kept[:, 1], kept[:, 2], kept[:, 3])
        return Decoded(boxes, scores, ids)


def _single_rank3_output(session: ModelSession, layout: str, shape: str) -> tuple[int, TensorInfo]:
    candidates = [(i, o) for i, o in enumerate(session.outputs) if len(o.shape) == 3]
    if len(candidates) != 1 or fixed(candidates[0][1].shape[0]) not in (None, 1):
        raise ModelError(
            session.path,
            f"{layout} layout needs one output {shape}; found: {_describe_outputs(session.outputs)}",
        )
    return candidates[0]


_SSD_ROLES = {"boxes": "box", "scores": "score", "classes": "class", "count": "num"}
# TF2 exports also carry pre-NMS tensors whose names contain the same words.
_SSD_IGNORED = ("raw", "multiclass", "anchor")


def _ssd_roles(outputs: Sequence[TensorInfo]) -> dict[str, int] | None:
    """Output index per SSD role, from the names, else from the shapes; None if neither fits."""
    by_name: dict[str, int] = {}
    for role, word in _SSD_ROLES.items():
        matches = [
            i
            for i, o in enumerate(outputs)
            if word in o.name.lower() and not any(x in o.name.lower() for x in _SSD_IGNORED)
        ]
        if len(matches) == 1:
            by_name[role] = matches[0]
    if len(by_name) == 4 and len(set(by_name.values())) == 4:
        return by_name
    if len(outputs) != 4:
        return None
    boxes = [i for i, o in enumerate(outputs) if len(o.shape) == 3 and fixed(o.shape[2]) == 4]
    counts = [
        i
        for i, o in enumerate(outputs)
        if len(o.shape) in (1, 2)
        and all(fixed(d) in (1, None) for d in o.shape)
        and (len(o.shape) == 1 or fixed(o.shape[1]) == 1)
    ]
    if len(boxes) != 1 or len(counts) != 1:
        return None
    rest = [i for i, o in enumerate(outputs) if i not in (*boxes, *counts) and len(o.shape) == 2]
    if len(rest) != 2:
        return None
    # By shape alone scores and classes look alike; TF's order (scores, then classes) is the
    # guess, and decode() swaps them if the "scores" turn out to be whole class numbers.
    return {"boxes": boxes[0], "scores": rest[0], "classes": rest[1], "count": counts[0]}


class SsdAdapter:
    """TF Object Detection API style: boxes [1, N, 4] (ymin, xmin, ymax, xmax in 0..1), scores
    [1, N], classes [1, N] (float ids, `class_offset` is subtracted: TF label maps start at 1),
    count [1] (valid rows)."""

    layout: Layout = "ssd"
    num_classes: int | None = None

    def __init__(self, path: Path, roles: dict[str, int], class_offset: int, by_name: bool) -> None:
        self.path = path
        self.roles = roles
        self.class_offset = class_offset
        self.by_name = by_name

    @classmethod
    def from_session(cls, session: ModelSession, class_offset: int) -> SsdAdapter:
        roles = _ssd_roles(session.outputs)
        if roles is None:
            raise ModelError(
                session.path,
                "ssd layout needs outputs boxes [1, N, 4], scores [1, N], classes [1, N] and "
                f"count [1] (named *box*, *score*, *class*, *num*); found: "
                f"{_describe_outputs(session.outputs)}",
            )
        names = [session.outputs[i].name for i in roles.values()]
        by_name = all(word in n.lower() for word, n in zip(_SSD_ROLES.values(), names, strict=True))
        return cls(session.path, roles, class_offset, by_name)

    def decode(
        self,
        outputs: Sequence[npt.NDArray[Any]],
        input_width: int,
        input_height: int,
        score_threshold: float,
    ) -> Decoded:
        boxes = np.asarray(outputs[self.roles["boxes"]], dtype=np.float32)
        scores = np.asarray(outputs[self.roles["scores"]], dtype=np.float32)
        classes = np.asarray(outputs[self.roles["classes"]], dtype=np.float32)
        count_raw = np.asarray(outputs[self.roles["count"]]).reshape(-1)
        if boxes.ndim != 3 or boxes.shape[0] != 1 or boxes.shape[2] != 4:
            raise InferenceError(self.path, f"ssd boxes came back {list(boxes.shape)}")
        n = boxes.shape[1]
        if scores.shape != (1, n) or classes.shape != (1, n) or count_raw.size != 1:
            raise InferenceError(
                self.path,
                f"ssd outputs disagree: boxes {list(boxes.shape)}, scores {list(scores.shape)}, "
                f"classes {list(classes.shape)}, count {list(count_raw.shape)}",
            )
        count = min(n, max(0, int(count_raw[0])))
        box, score, cls = boxes[0, :count], scores[0, :count], classes[0, :count]
        if not self.by_name and _whole(score) and not _whole(cls):
            score, cls = cls, score
        keep = score >= score_threshold
        ids = np.rint(cls[keep]).astype(np.int64) - self.class_offset
        valid = ids >= 0
        box, score, ids = box[keep][valid], score[keep][valid], ids[valid]
        scale = np.array([input_height, input_width, input_height, input_width], np.float32)
        ymin, xmin, ymax, xmax = (box * scale).T
        return Decoded(np.stack([xmin, ymin, xmax, ymax], axis=-1).astype(np.float32), score, ids)


def _whole(values: FloatArray) -> bool:
    return bool(values.size) and bool(np.all(values == np.rint(values)))


def _labels_count_hint(session: ModelSession) -> int | None:
    labels = _metadata_labels(session)
    return None if labels is None else len(labels)


def detect_layout(session: ModelSession, num_classes: int | None = None) -> Layout:
    """The output layout of a loaded model: metadata `appliance.layout` when present, else
    recognised from the outputs' count, names and shapes. `num_classes` (from the labels)
    settles [1, N, K] between yolov5 (K = 5+C) and a transposed yolov8 (K = 4+C); without it
    the model's label metadata is used, and failing that a [1, N, K] with N > K is yolov5."""
    declared = session.metadata.get("appliance.layout")
    if declared is not None:
        for layout in LAYOUTS:
            if declared == layout:
                return layout
        raise ModelError(
            session.path,
            f"metadata appliance.layout={declared!r} is not one of {list(LAYOUTS)}",
        )
    if "appliance.darknet.heads" in session.metadata:
        return "darknet"
    if num_classes is None:
        num_classes = _labels_count_hint(session)
    outputs = session.outputs
    if len(outputs) >= 3 and _ssd_roles(outputs) is not None:
        return "ssd"
    if len(outputs) == 1 and len(outputs[0].shape) == 3 and fixed(outputs[0].shape[0]) in (None, 1):
        a, b = fixed(outputs[0].shape[1]), fixed(outputs[0].shape[2])
        if num_classes is not None:
            if b == 5 + num_classes:
                return "yolov5"
            if a == 4 + num_classes or b == 4 + num_classes:
                return "yolov8"
        elif a is not None and (b is None or a < b):
            return "yolov8"
        elif b is not None and (a is None or b < a):
            return "yolov5"
    classes = "" if num_classes is None else f" (for {num_classes} classes)"
    raise ModelError(
        session.path,
        f"unrecognised output layout{classes}: {_describe_outputs(outputs)}; expected one of: "
        f"{EXPECTED_LAYOUTS}. Set `layout` (and `labels_file`) in the model's config if it is one "
        "of these.",
    )


def build_adapter(
    layout: Layout, session: ModelSession, num_classes: int | None, class_offset: int
) -> Adapter:
    """The adapter for `layout`, checked against the model's declared outputs."""
    if layout == "darknet":
        return DarknetAdapter.from_session(session)
    if layout == "yolov5":
        return YoloV5Adapter.from_session(session, num_classes)
    if layout == "yolov8":
        return YoloV8Adapter.from_session(session, num_classes)
    if layout == "ssd":
        return SsdAdapter.from_session(session, class_offset)
    raise ModelError(session.path, f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")


# -- labels and metadata -------------------------------------------------------------------------


def read_labels_file(path: Path) -> tuple[str, ...]:
    """Class names, one a line (trailing blank lines ignored; a blank line inside is an error,
    since it would shift every later class id)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(path, f"cannot read the labels file: {exc.strerror or exc}") from exc
    lines = [line.strip() for line in text.rstrip().splitlines()]
    if not lines:
        raise ModelError(path, "the labels file is empty")
    for number, line in enumerate(lines, start=1):
        if not line:
            raise ModelError(path, f"line {number} of the labels file is blank")
    return tuple(lines)


def _metadata_labels(session: ModelSession) -> tuple[str, ...] | None:
    """Labels from `appliance.labels` (JSON list), else Ultralytics' `names` ({0: 'person'...})."""
    labels = session.metadata_json("appliance.labels")
    if labels is not None:
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(x, str) for x in labels)
        ):
            raise ModelError(session.path, "metadata 'appliance.labels' must be a list of names")
        return tuple(labels)
    names = session.metadata.get("names")
    if names is None:
        return None
    try:
        value = ast.literal_eval(names)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, dict) and set(value) == set(range(len(value))) and value:
        value = [value[i] for i in range(len(value))]
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return tuple(value)
    log.warning("%s: ignoring unreadable metadata names=%.80r", session.path, names)
    return None


def sha256_prefix(path: Path, digits: int = 12) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:digits]


@dataclass(frozen=True, slots=True)
class InputSpec:
    """How frames become the model's input tensor."""

    width: int
    height: int
    layout: Literal["nchw", "nhwc"]
    dtype: np.dtype[Any]
    rgb: bool
    scale: float
    resize: Literal["letterbox", "stretch"]

    @classmethod
    def from_session(cls, session: ModelSession) -> InputSpec:
        spec = session.metadata_json("appliance.input") or {}
        if not isinstance(spec, dict):
            raise ModelError(session.path, "metadata 'appliance.input' must be an object")
        fmt = spec.get("format", "rgb")
        scale = spec.get("scale", 1 / 255)
        resize = spec.get("resize", "letterbox")
        if fmt not in ("rgb", "bgr"):
            raise ModelError(session.path, f"metadata input format {fmt!r} is not rgb or bgr")
        if not _number(scale) or scale <= 0:
            raise ModelError(session.path, f"metadata input scale {scale!r} is not a number > 0")
        if resize not in ("letterbox", "stretch"):
            raise ModelError(
                session.path, f"metadata input resize {resize!r} is not letterbox or stretch"
            )
        width, height = session.input_size
        return cls(
            width, height, session.image_layout, session.input_dtype, fmt == "rgb", scale, resize
        )

    def prepare(self, image_bgr: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[Any], Geometry]:
        placed, geometry = _resize_into(image_bgr, self.width, self.height, self.resize)
        if self.rgb:
            placed = np.asarray(cv2.cvtColor(placed, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        tensor: npt.NDArray[Any]
        if self.dtype == np.uint8:
            # uint8 models (TF exports) normalise inside the graph.
            tensor = placed
        else:
            tensor = (placed.astype(np.float32) * np.float32(self.scale)).astype(self.dtype)
        if self.layout == "nchw":
            tensor = tensor.transpose(2, 0, 1)
        return np.ascontiguousarray(tensor[None]), geometry


# -- the detector ----------------------------------------------------------------------------------


class OnnxDetector:
    """A Detector (inference.detections) backed by an ONNX model on its own executor.

    Loading blocks (reads, hashes and warms the model): from the event loop, construct it with
    `asyncio.to_thread`. `class_offset` applies to the ssd layout only (subtracted from the
    model's class numbers); None: metadata `appliance.class_offset`, else 1 (TF label maps).
    `labels` (from a model package) apply when the config names no labels_file.
    """

    def __init__(
        self,
        cfg: DetectorModel,
        model_path: Path,
        name: str,
        classes: Sequence[str] | None = None,
        *,
        class_offset: int | None = None,
        warm_up: bool = True,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self._given_labels = None if labels is None else tuple(labels)
        self.session = ModelSession(
            model_path, name=name, providers=cfg.providers, threads=cfg.threads, warm_up=False
        )
        try:
            self._setup(classes, class_offset)
            if warm_up:
                self.session.warm_up()
        except BaseException:
            self.session.close()
            raise

    def _setup(self, classes: Sequence[str] | None, class_offset: int | None) -> None:
        session, cfg = self.session, self.cfg
        path = session.path
        if cfg.labels_file:
            given: tuple[str, ...] | None = read_labels_file(cfg.labels_file)
        else:
            given = self._given_labels or _metadata_labels(session)
        hint = None if given is None else len(given)
        self.layout: Layout = detect_layout(session, hint) if cfg.layout == "auto" else cfg.layout
        if class_offset is None:
            meta_offset = session.metadata_json("appliance.class_offset")
            if meta_offset is not None and (not isinstance(meta_offset, int) or meta_offset < 0):
                raise ModelError(path, "metadata 'appliance.class_offset' must be an integer >= 0")
            class_offset = 1 if meta_offset is None else meta_offset
        self.adapter: Adapter = build_adapter(self.layout, session, hint, class_offset)
        num_classes = self.adapter.num_classes
        if given is not None and num_classes is not None and len(given) != num_classes:
            source = cfg.labels_file or (
                "the package's labels" if self._given_labels else "the model's metadata"
            )
            raise ModelError(
                path, f"{source} names {len(given)} classes but the model outputs {num_classes}"
            )
        if given is not None:
            self.labels: tuple[str, ...] = given
        elif num_classes == len(COCO_LABELS):
            self.labels = COCO_LABELS
        else:
            self.labels = tuple(f"class_{i}" for i in range(num_classes or 0))

        version = cfg.version or session.metadata.get("appliance.version") or sha256_prefix(path)
        self.version: str = version
        self.input_spec = InputSpec.from_session(session)
        self.class_filter = self._class_ids(classes)
        self._stats = LatencyRecorder()

    def _class_ids(self, classes: Sequence[str] | None) -> frozenset[int] | None:
        if not classes:
            return None
        unknown = [c for c in classes if c not in self.labels]
        if unknown:
            known = ", ".join(self.labels) if self.labels else "none (give labels_file)"
            raise ModelError(
                self.session.path,
                f"class filter names {unknown}, not labels of model {self.name!r}; its labels: "
                f"{known}",
            )
        wanted = set(classes)
        return frozenset(i for i, label in enumerate(self.labels) if label in wanted)

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else f"class_{class_id}"

    async def detect(self, image: npt.NDArray[np.uint8]) -> list[Detection]:
        """Detections in one BGR frame, best first; all the work runs on the model's executor."""
        _check_image(image)
        return await self.session.call(self.detect_blocking, image)

    def detect_blocking(self, image: npt.NDArray[np.uint8]) -> list[Detection]:
        """`detect` in the calling thread (benchmarks, replay tools that own their threads)."""
        _check_image(image)
        start = time.perf_counter()
        try:
            found = self._detect(image)
        except Exception:
            self._stats.error()
            raise
        self._stats.record(time.perf_counter() - start)
        return found

    def _detect(self, image: npt.NDArray[np.uint8]) -> list[Detection]:
        spec = self.input_spec
        tensor, geometry = spec.prepare(image)
        outputs = self.session.run_blocking({self.session.input.name: tensor})
        boxes, scores, ids = self.adapter.decode(
            outputs, spec.width, spec.height, self.cfg.score_threshold
        )
        if self.class_filter is not None and len(ids):
            wanted = np.isin(ids, np.fromiter(self.class_filter, dtype=np.int64))
            boxes, scores, ids = boxes[wanted], scores[wanted], ids[wanted]
        if len(scores) > MAX_NMS_CANDIDATES:
            best = np.argsort(-scores, kind="stable")[:MAX_NMS_CANDIDATES]
            boxes, scores, ids = boxes[best], scores[best], ids[best]
        finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
        boxes, scores, ids = boxes[finite], scores[finite], ids[finite]
        keep = nms(boxes, scores, self.cfg.nms_iou, ids)
        height, width = image.shape[:2]
        mapped = unletterbox(
            boxes[keep],
            (geometry.scale_x, geometry.scale_y),
            geometry.pad_x,
            geometry.pad_y,
            width,
            height,
        )
        found: list[Detection] = []
        for (x1, y1, x2, y2), score, class_id in zip(
            mapped.tolist(), scores[keep].tolist(), ids[keep].tolist(), strict=True
        ):
            if x2 <= x1 or y2 <= y1:  # entirely in the padding, or clipped away
                continue
            found.append(Detection(x1, y1, x2, y2, score, class_id, self.label(class_id)))
            if len(found) == MAX_DETECTIONS:
                break
        return found

    @property
    def stats(self) -> LatencyStats:
        """Latency of whole detect() calls (preprocessing, inference, decoding, NMS)."""
        return self._stats.snapshot()

    def describe(self) -> dict[str, object]:
        """What the status page shows about this detector."""
        return {
            **self.session.describe(),
            "version": self.version,
            "layout": self.layout,
            "classes": len(self.labels),
            "detect_latency": self.stats.as_dict(),
        }

    def close(self) -> None:
        self.session.close()

    async def aclose(self) -> None:
        await self.session.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def open_detector(
    cfg: DetectorModel,
    name: str,
    classes: Sequence[str] | None = None,
    *,
    packages: PackageResolver | None = None,
) -> OnnxDetector:
    """The detector `cfg` describes; `builtin:` paths resolve to the shipped model (which may be
    converted on first use, so call this via `asyncio.to_thread` from the loop), `package:NAME`
    to the verified active version of an installed package in `packages` (whose manifest gives
    the labels, thresholds and version the config leaves unset)."""
    if cfg.path.startswith("package:"):
        # Imported here: package verification (cryptography) is only needed when a config asks.
        from inference.packages import PREFIX, detector_settings

        if packages is None:
            raise ModelError(
                cfg.path,
                "a package model needs the appliance's model store (DATA_DIR/models/packages), "
                "which this caller did not give",
            )
        package = packages.resolve(cfg.path.removeprefix(PREFIX))
        settings, labels = detector_settings(cfg, package)
        return OnnxDetector(settings, package.model_path, name, classes, labels=labels)
    if cfg.path.startswith("builtin:"):
        # Imported here: the built-in model's machinery (conversion from darknet) is only needed
        # when a config asks for it.
        from inference.builtin import builtin_model_path

        path = builtin_model_path(cfg.path)
    else:
        path = Path(cfg.path).expanduser()
    return OnnxDetector(cfg, path, name, classes)
