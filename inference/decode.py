"""Detector output decoding: the output layouts (YOLO darknet-style heads, YOLOv5, YOLOv8/v11,
SSD), recognised from a model's outputs and metadata, their adapters from raw outputs to candidate
boxes, and the class-aware NMS that thins the candidates."""

from __future__ import annotations

import ast
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from inference.preprocess import finite_number
from inference.session import InferenceError, ModelError, ModelSession, TensorInfo, fixed

log = logging.getLogger(__name__)

Layout = Literal["darknet", "yolov5", "yolov8", "ssd"]
LAYOUTS: tuple[Layout, ...] = ("darknet", "yolov5", "yolov8", "ssd")
EXPECTED_LAYOUTS = (
    "darknet (rank-4 heads [1, A*(5+C), h, w] described by metadata 'appliance.darknet.heads'), "
    "yolov5 (one output [1, N, 5+C]), yolov8/v11 (one output [1, 4+C, N] or [1, N, 4+C]), "
    "ssd (boxes [1, N, 4], scores [1, N], classes [1, N], count [1])"
)

# exp() of a raw darknet width beyond this is a box thousands of times the anchor: garbage, and
# float32 would overflow to inf (and IoU to NaN) a little further on.
_MAX_EXP = 30.0

FloatArray = npt.NDArray[np.float32]


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
                isinstance(a, list) and len(a) == 2 and all(finite_number(v) and v > 0 for v in a)
                for a in anchors
            )
        ):
            raise ModelError(path, f"{where}: `anchors` must be a list of [w, h] > 0 pairs")
        scale_x_y = entry.get("scale_x_y", 1.0)
        if not finite_number(scale_x_y) or scale_x_y <= 0:
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
    labels = metadata_labels(session)
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


# -- labels in the model's metadata ----------------------------------------------------------------


def metadata_labels(session: ModelSession) -> tuple[str, ...] | None:
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
