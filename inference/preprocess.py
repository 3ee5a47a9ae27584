"""Detector preprocessing: frames placed into a model's input tensor (letterbox or stretch, as the
model's `InputSpec` says) and boxes mapped back from network-input to frame pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from inference.session import ModelError, ModelSession

PAD_VALUE = 114  # the grey YOLO letterboxes with; what the models saw in training

FloatArray = npt.NDArray[np.float32]


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
    check_image(image_bgr)
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


def check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected a BGR uint8 image (H x W x 3 numpy array), got {kind}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected a BGR image of shape H x W x 3, got shape {image.shape}")


def finite_number(value: Any) -> bool:
    """Whether `value` is a finite JSON number (not a bool), as model metadata must give."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
        if not finite_number(scale) or scale <= 0:
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
