"""Test helpers that build small ONNX graphs with onnx.helper: image models whose outputs are fixed
tensors shaped like each detector layout (encoding known boxes), slow models, and malformed ones.

Every output still depends on the image input (constant + 0 * mean(image)), so onnxruntime needs a
correctly shaped image and cannot fold the graph away.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
INPUT = "images"


# -- generic graphs ---------------------------------------------------------------------------------


def save(model: onnx.ModelProto, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    if metadata:
        helper.set_model_props(model, dict(metadata))
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())
    return path


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests"
    )


def _zero_from_input(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    input_name: str,
    input_type: int,
) -> str:
    """Nodes computing the scalar 0 * mean(image); its name."""
    x = input_name
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], ["image_f"], to=TensorProto.FLOAT))
        x = "image_f"
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    nodes.append(helper.make_node("ReduceMean", [x], ["image_mean"], keepdims=0))
    nodes.append(helper.make_node("Mul", ["image_mean", "zero"], ["image_zero"]))
    return "image_zero"


def constant_model(
    path: Path,
    outputs: Mapping[str, npt.ArrayLike],
    *,
    input_shape: Sequence[int | str | None] = (1, 3, 640, 640),
    input_type: int = TensorProto.FLOAT,
    input_name: str = INPUT,
    metadata: Mapping[str, str] | None = None,
    output_shapes: Mapping[str, Sequence[int | str | None]] | None = None,
) -> Path:
    """An image model whose outputs are `outputs` (float32), whatever the image.

    `output_shapes` overrides the declared shape of an output (e.g. dynamic dims)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    zero = _zero_from_input(nodes, inits, input_name, input_type)
    infos = []
    for name, value in outputs.items():
        array = np.asarray(value, dtype=np.float32)
        inits.append(numpy_helper.from_array(array, f"{name}_value"))
        nodes.append(helper.make_node("Add", [f"{name}_value", zero], [name]))
        shape = (output_shapes or {}).get(name, array.shape)
        infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
    graph = helper.make_graph(
        nodes,
        "constant_outputs",
        [helper.make_tensor_value_info(input_name, input_type, list(input_shape))],
        infos,
        initializer=inits,
    )
    return save(_model(graph), path, metadata)


def slow_model(
    path: Path,
    outputs: Mapping[str, npt.ArrayLike],
    *,
    input_shape: Sequence[int] = (1, 3, 64, 64),
    size: int = 768,
    steps: int = 12,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Like `constant_model`, but every run first multiplies a size x size matrix `steps` times
    (about 2 * size^3 * steps flops), so one run takes a while on one thread. The matrix depends
    on the image, so onnxruntime cannot precompute it."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    zero = _zero_from_input(nodes, inits, INPUT, TensorProto.FLOAT)
    # The identity keeps the values bounded (no overflow to inf, so 0 * result stays 0).
    inits.append(numpy_helper.from_array(np.eye(size, dtype=np.float32), "eye"))
    inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    nodes.append(helper.make_node("Add", [zero, "one"], ["start_scale"]))
    nodes.append(helper.make_node("Mul", ["eye", "start_scale"], ["m0"]))
    for step in range(steps):
        nodes.append(helper.make_node("MatMul", [f"m{step}", "eye"], [f"m{step + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"m{steps}"], ["m_mean"], keepdims=0))
    nodes.append(helper.make_node("Mul", ["m_mean", "zero"], ["slow_zero"]))
    infos = []
    for name, value in outputs.items():
        array = np.asarray(value, dtype=np.float32)
        inits.append(numpy_helper.from_array(array, f"{name}_value"))
        nodes.append(helper.make_node("Add", [f"{name}_value", "slow_zero"], [name]))
        infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(array.shape)))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(input_shape))],
        infos,
        initializer=inits,
    )
    return save(_model(graph), path, metadata)


def identity_model(
    path: Path,
    input_shape: Sequence[int | str | None],
    input_type: int = TensorProto.FLOAT,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Returns its input unchanged: shows exactly what a session was fed."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [INPUT], ["echo"])],
        "identity",
        [helper.make_tensor_value_info(INPUT, input_type, list(input_shape))],
        [helper.make_tensor_value_info("echo", input_type, list(input_shape))],
    )
    return save(_model(graph), path, metadata)


def two_input_model(path: Path) -> Path:
    """Two image inputs (e.g. a stereo model): not a detector we can feed."""
    shape = [1, 3, 64, 64]
    graph = helper.make_graph(
        [helper.make_node("Add", ["left", "right"], ["sum"])],
        "two_inputs",
        [
            helper.make_tensor_value_info("left", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("right", TensorProto.FLOAT, shape),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, shape)],
    )
    return save(_model(graph), path)


def rank2_input_model(path: Path) -> Path:
    """A tabular model ([1, 8] in): loads fine, but it is no image model."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["features"], ["out"])],
        "tabular",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])],
    )
    return save(_model(graph), path)


# -- known boxes encoded in each layout --------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A box in network-input pixels with the class and score a model should report for it."""

    x1: float
    y1: float
    x2: float
    y2: float
    class_id: int
    score: float

    @property
    def cxcywh(self) -> tuple[float, float, float, float]:
        return (
            (self.x1 + self.x2) / 2,
            (self.y1 + self.y2) / 2,
            self.x2 - self.x1,
            self.y2 - self.y1,
        )


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def yolov8_output(
    boxes: Sequence[Box], num_classes: int, anchors: int = 200, transposed: bool = False
) -> npt.NDArray[np.float32]:
    """[1, 4+C, anchors] (or [1, anchors, 4+C]): the boxes first, zero-score rows after."""
    rows = np.zeros((anchors, 4 + num_classes), np.float32)
    rows[:, :4] = (100.0, 100.0, 20.0, 20.0)  # harmless boxes that score 0
    for i, box in enumerate(boxes):
        rows[i, :4] = box.cxcywh
        rows[i, 4 + box.class_id] = box.score
    return rows[None] if transposed else rows.T[None].copy()


def yolov5_output(
    boxes: Sequence[Box], num_classes: int, anchors: int = 300
) -> npt.NDArray[np.float32]:
    """[1, anchors, 5+C]; objectness and class score are both sqrt(score), so score = product."""
    rows = np.zeros((anchors, 5 + num_classes), np.float32)
    rows[:, :4] = (100.0, 100.0, 20.0, 20.0)
    rows[:, 5:] = 0.9  # confident classes, but no object: still scores 0
    for i, box in enumerate(boxes):
        rows[i, :4] = box.cxcywh
        rows[i, 4] = math.sqrt(box.score)
        rows[i, 5:] = 0.0
        rows[i, 5 + box.class_id] = math.sqrt(box.score)
    return rows[None]


def ssd_outputs(
    boxes: Sequence[Box],
    input_width: int,
    input_height: int,
    rows: int = 20,
    class_offset: int = 1,
    names: tuple[str, str, str, str] = (
        "detection_boxes",
        "detection_scores",
        "detection_classes",
        "num_detections",
    ),
) -> dict[str, npt.NDArray[np.float32]]:
    """TF-OD-API outputs: boxes [1, rows, 4] (ymin, xmin, ymax, xmax in 0..1), scores, classes
    (class_id + class_offset, as float), count. Rows past the count hold junk that must be
    ignored."""
    b = np.full((1, rows, 4), 0.5, np.float32)
    s = np.full((1, rows), 0.99, np.float32)  # junk beyond the count
    c = np.full((1, rows), 1.0 + class_offset, np.float32)
    for i, box in enumerate(boxes):
        b[0, i] = (
            box.y1 / input_height,
            box.x1 / input_width,
            box.y2 / input_height,
            box.x2 / input_width,
        )
        s[0, i] = box.score
        c[0, i] = box.class_id + class_offset
    count = np.array([len(boxes)], np.float32)
    return dict(zip(names, (b, s, c, count), strict=True))


@dataclass(frozen=True)
class Head:
    """One darknet head: output name, grid (h, w), masked anchors (w, h) in input pixels."""

    output: str
    grid: tuple[int, int]
    anchors: tuple[tuple[float, float], ...]
    scale_x_y: float = 1.0
    new_coords: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "output": self.output,
            "anchors": [list(a) for a in self.anchors],
            "scale_x_y": self.scale_x_y,
            "new_coords": self.new_coords,
        }


def darknet_outputs(
    placed: Sequence[tuple[Box, int, int]],
    heads: Sequence[Head],
    num_classes: int,
    input_width: int,
    input_height: int,
) -> dict[str, npt.NDArray[np.float32]]:
    """Raw head tensors [1, A*(5+C), h, w] that decode (darknet semantics) to `placed` boxes,
    each given as (box, head index, anchor index); every other cell scores ~0.

    The inverse of darknet's decoding: with new_coords=0, x = (sigmoid(tx) * s - (s-1)/2 + col)
    / w * W so tx = logit(...), and w = exp(tw) * anchor; with new_coords=1 the values are
    already logistic and w = (2 * tw)^2 * anchor.
    """
    out: dict[str, npt.NDArray[np.float32]] = {}
    for head in heads:
        gh, gw = head.grid
        per = 5 + num_classes
        raw = np.zeros((len(head.anchors), per, gh, gw), np.float32)
        if not head.new_coords:
            raw[:, 4:] = -20.0  # objectness and classes: sigmoid ~ 2e-9
        out[head.output] = raw
    for box, head_index, anchor_index in placed:
        head = heads[head_index]
        gh, gw = head.grid
        raw = out[head.output]
        cx, cy, bw, bh = box.cxcywh
        gx, gy = cx / input_width * gw, cy / input_height * gh
        col, row = int(gx), int(gy)
        s = head.scale_x_y
        fx = (gx - col + (s - 1) / 2) / s
        fy = (gy - row + (s - 1) / 2) / s
        aw, ah = head.anchors[anchor_index]
        obj = cls = math.sqrt(box.score)
        cell = raw[anchor_index, :, row, col]
        if head.new_coords:
            cell[:4] = (fx, fy, math.sqrt(bw / aw) / 2, math.sqrt(bh / ah) / 2)
            cell[4] = obj
            cell[5 + box.class_id] = cls
        else:
            cell[:4] = (_logit(fx), _logit(fy), math.log(bw / aw), math.log(bh / ah))
            cell[4] = _logit(obj)
            cell[5 + box.class_id] = _logit(cls)
    return {name: raw.reshape(1, -1, *raw.shape[2:]) for name, raw in out.items()}


def darknet_metadata(
    heads: Sequence[Head], labels: Sequence[str], width: int, height: int
) -> dict[str, str]:
    """The metadata our darknet converter writes (see inference/darknet.py)."""
    return {
        "appliance.layout": "darknet",
        "appliance.darknet.heads": json.dumps([h.as_dict() for h in heads]),
        "appliance.input": json.dumps(
            {
                "width": width,
                "height": height,
                "format": "rgb",
                "scale": 1 / 255,
                "resize": "letterbox",
            }
        ),
        "appliance.labels": json.dumps(list(labels)),
        "appliance.name": "test-darknet",
        "appliance.version": "test-1",
    }
