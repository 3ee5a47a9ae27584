"""Payload media of camera events: JPEG snapshots under a byte cap, privacy blur, the pre-roll
frame ring and pre+post-roll clip building, and the media errors (writing a clip's file is
`inference.clips`').

Everything here is synchronous CPU work with no event loop in sight: the pipeline runs it in a
worker thread (`asyncio.to_thread`). Nothing here touches the journal; the caller stores what
these functions return.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from config.cameras import ClipSettings, SnapshotSettings
from inference.detections import Detection

Image = npt.NDArray[np.uint8]
TimedImage = tuple[int, Image]

# Quality is stepped down before size: a smaller but sharper picture tells less than a full-size
# slightly blockier one. Below ~30 JPEG artefacts hide more than a smaller size would.
QUALITY_STEP = 10
MIN_QUALITY = 30
SIZE_STEP = 0.75
MIN_SNAPSHOT_WIDTH = 64

# Pixelating to this many blocks across the box's shorter side leaves a face (a third of a
# person's width, or the whole of a face box) at a few blocks: nobody can be recognised.
BLUR_BLOCKS = 8
BLUR_MARGIN = 0.1  # the box grows by this share of its size on each side (hair, ears, edges)

MAX_CLIP_S = 60.0  # hard cap of a clip's length, however often it is extended
MAX_CLIP_FRAMES = 1800  # ...and of its frames (60 s at 30 fps), so memory stays bounded

_NS = 1_000_000_000


class MediaError(Exception):
    """Media that could not be produced. `retryable` says whether trying again may help."""

    retryable = False


class SnapshotTooLarge(MediaError):
    """No quality and size down to the minimums brought the JPEG under the byte cap."""

    def __init__(
        self, max_bytes: int, smallest: int, width: int, height: int, quality: int
    ) -> None:
        self.max_bytes = max_bytes
        self.smallest = smallest
        super().__init__(
            f"snapshot does not fit in max_bytes={max_bytes}: the smallest encoding "
            f"({width}x{height} at quality {quality}) is {smallest} bytes"
        )


class ClipWriteError(MediaError):
    """A clip could not be written or did not read back as written."""

    def __init__(self, path: Path, message: str, *, retryable: bool = False) -> None:
        self.path = path
        self.retryable = retryable
        super().__init__(f"clip {path}: {message}")


# ---------------------------------------------------------------------------------- images


def check_image(image: object, what: str = "image") -> Image:
    """The image as a BGR uint8 HxWx3 array, or a ValueError naming what is wrong with it."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 BGR, not {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be height x width x 3 (BGR), not shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{what} is empty (shape {image.shape})")
    return image


def fit_width(image: Image, max_width: int) -> Image:
    """A copy of the image no wider than max_width (aspect kept; never enlarged)."""
    height, width = image.shape[:2]
    if width <= max_width:
        return image.copy()
    new_height = max(1, round(height * max_width / width))
    # INTER_AREA averages the source pixels: no aliasing shimmer when shrinking a lot. Below a
    # halving, bilinear looks the same and costs a fifth (this runs on every frame of a camera
    # with clips: bench/detection.py measured 2.0 ms against 0.4 ms for 768 -> 640 pixels).
    interpolation = cv2.INTER_AREA if width >= 2 * max_width else cv2.INTER_LINEAR
    return np.asarray(
        cv2.resize(image, (max_width, new_height), interpolation=interpolation), dtype=np.uint8
    )


def _colour(class_id: int) -> tuple[int, int, int]:
    """A stable, saturated colour per class, so one class looks the same in every snapshot."""
    hue = (class_id * 47) % 180
    hsv = np.array([[[hue, 220, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw_detections(image: Image, detections: Sequence[Detection], scale: float) -> None:
    """Draw boxes with `label score` in place; boxes are in pixels of an image `1/scale` as wide.

    Lines and text are sized for the output image, not the source, so a shrunken snapshot keeps
    thin lines and readable labels.
    """
    height, width = image.shape[:2]
    thickness = max(1, round(width / 640))
    font_scale = max(0.35, min(1.0, width / 1280))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for det in detections:
        x1 = min(max(round(det.x1 * scale), 0), width - 1)
        y1 = min(max(round(det.y1 * scale), 0), height - 1)
        x2 = min(max(round(det.x2 * scale), 0), width - 1)
        y2 = min(max(round(det.y2 * scale), 0), height - 1)
        colour = _colour(det.class_id)
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, thickness, cv2.LINE_AA)
        text = f"{det.label} {det.score:.2f}"
        (tw, th), baseline = cv2.getTextSize(text, font, font_scale, thickness)
        # The label sits above the box, or inside it when the box touches the top edge.
        top = y1 - th - baseline - 2 if y1 - th - baseline - 2 >= 0 else y1
        cv2.rectangle(image, (x1, top), (x1 + tw + 2, top + th + baseline + 2), colour, cv2.FILLED)
        cv2.putText(
            image, text, (x1 + 1, top + th + 1), font, font_scale, (0, 0, 0), thickness, cv2.LINE_AA
        )


def encode_snapshot(
    image_bgr: Image,
    cfg: SnapshotSettings,
    boxes_to_draw: list[Detection] | None = None,
) -> bytes:
    """A JPEG of the frame no wider than cfg.max_width and no larger than cfg.max_bytes.

    Boxes (in the frame's pixels) are drawn with their labels when given. Quality starts at
    cfg.quality and steps down to MIN_QUALITY; if that is not enough the picture shrinks and the
    quality ladder starts again. Raises SnapshotTooLarge if even the smallest try does not fit.
    The input image is not modified.
    """
    source = check_image(image_bgr, "snapshot image")
    src_width = source.shape[1]
    width = min(src_width, cfg.max_width)
    # e.g. 80, 70, 60, 50, 40, 30; a configured quality at or under the floor is tried alone.
    qualities = [*range(cfg.quality, MIN_QUALITY, -QUALITY_STEP), min(cfg.quality, MIN_QUALITY)]
    while True:
        picture = fit_width(source, width)
        if boxes_to_draw:
            draw_detections(picture, boxes_to_draw, picture.shape[1] / src_width)
        size = 0
        for quality in qualities:
            ok, buffer = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise MediaError(f"OpenCV could not JPEG-encode a {picture.shape} image")
            data = buffer.tobytes()
            size = len(data)
            if size <= cfg.max_bytes:
                return data
        if width <= MIN_SNAPSHOT_WIDTH:
            raise SnapshotTooLarge(
                cfg.max_bytes, size, picture.shape[1], picture.shape[0], qualities[-1]
            )
        width = max(MIN_SNAPSHOT_WIDTH, math.floor(width * SIZE_STEP))


def blur_regions(
    image_bgr: Image, detections: Iterable[Detection], classes: Collection[str]
) -> Image:
    """A copy of the image with every box of `classes` made unrecognisable; the input is kept.

    Each box grows by BLUR_MARGIN on every side and is clipped to the frame. Its content is
    pixelated to BLUR_BLOCKS blocks across its shorter side (this discards the detail for good,
    unlike a Gaussian, which can be partly undone), then smoothed so the block edges do not
    leave a grid of sharp lines.
    """
    image = check_image(image_bgr, "image to blur")
    out = image.copy()
    if not classes:
        return out
    height, width = out.shape[:2]
    for det in detections:
        if det.label not in classes:
            continue
        box_w, box_h = det.x2 - det.x1, det.y2 - det.y1
        if not (box_w > 0 and box_h > 0):
            continue
        x1 = max(0, math.floor(det.x1 - BLUR_MARGIN * box_w))
        y1 = max(0, math.floor(det.y1 - BLUR_MARGIN * box_h))
        x2 = min(width, math.ceil(det.x2 + BLUR_MARGIN * box_w))
        y2 = min(height, math.ceil(det.y2 + BLUR_MARGIN * box_h))
        if x2 - x1 < 1 or y2 - y1 < 1:
            continue  # entirely outside the frame
        region = out[y1:y2, x1:x2]
        rh, rw = region.shape[:2]
        block = max(2.0, min(rw, rh) / BLUR_BLOCKS)
        small_w, small_h = max(1, round(rw / block)), max(1, round(rh / block))
        small = cv2.resize(region, (small_w, small_h), interpolation=cv2.INTER_AREA)
        blocky = cv2.resize(small, (rw, rh), interpolation=cv2.INTER_NEAREST)
        sigma = block / 2
        # Overlapping boxes are blurred in turn, each on the already blurred pixels: no box can
        # bring back detail another one removed.
        out[y1:y2, x1:x2] = cv2.GaussianBlur(blocky, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return out


# ------------------------------------------------------------------------------ frame ring


class FrameRing:
    """Recent frames of one camera, for the pre-roll of clips, bounded by age, count and width.

    Frames are shrunk to `max_width` when they are added, so the memory held is at most
    `max_frames` small frames (`bytes` says how much). Stored images are read-only: they are
    shared with the clips built from them, and nobody may draw on them.
    """

    def __init__(self, seconds: float, max_frames: int, max_width: int) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"FrameRing seconds must be >= 0, not {seconds}")
        if max_frames < 1:
            raise ValueError(f"FrameRing max_frames must be >= 1, not {max_frames}")
        if max_width < 16:
            raise ValueError(f"FrameRing max_width must be >= 16, not {max_width}")
        self.seconds = seconds
        self.max_frames = max_frames
        self.max_width = max_width
        self._frames: deque[TimedImage] = deque()
        self._bytes = 0

    def add(self, mono_ns: int, image: Image) -> Image:
        """Keep a shrunken copy of the frame; returns it (read-only) for reuse by clip builders.

        Frames must come in order of their monotonic time; one that does not is a ValueError.
        """
        if self._frames and mono_ns <= self._frames[-1][0]:
            raise ValueError(
                f"frame mono_ns {mono_ns} is not after the newest in the ring "
                f"({self._frames[-1][0]}); frames must be added in order"
            )
        stored = fit_width(check_image(image, "frame"), self.max_width)
        stored.setflags(write=False)
        self._frames.append((mono_ns, stored))
        self._bytes += stored.nbytes
        oldest_kept = mono_ns - round(self.seconds * _NS)
        while len(self._frames) > self.max_frames or self._frames[0][0] < oldest_kept:
            _, dropped = self._frames.popleft()
            self._bytes -= dropped.nbytes
        return stored

    def snapshot_since(self, mono_ns: int) -> list[TimedImage]:
        """The frames taken at or after `mono_ns`, oldest first (a new list; shared images)."""
        return [item for item in self._frames if item[0] >= mono_ns]

    def clear(self) -> None:
        self._frames.clear()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        """Bytes of image data held."""
        return self._bytes

    @property
    def newest_mono_ns(self) -> int | None:
        return self._frames[-1][0] if self._frames else None

    def __len__(self) -> int:
        return len(self._frames)


# ---------------------------------------------------------------------------- clip builder


class ClipBuilder:
    """Collects the frames of one clip: pre-roll before an alert, post-roll after it.

    `start()` takes the alert's monotonic time and the ring's recent frames (those within
    `pre_s` before the alert are kept); `feed()` takes each later frame until `post_s` after the
    alert, then `finished` turns true and `frames` is the clip to write. Another alert while it
    is open `extend()`s the post-roll instead of starting a second clip, up to a hard cap of
    `max_s` of clip (and `max_frames` frames) so memory stays bounded.
    """

    def __init__(
        self,
        pre_s: float,
        post_s: float,
        *,
        max_s: float = MAX_CLIP_S,
        max_frames: int = MAX_CLIP_FRAMES,
        max_width: int | None = None,
    ) -> None:
        if not (math.isfinite(pre_s) and pre_s >= 0):
            raise ValueError(f"clip pre_s must be >= 0, not {pre_s}")
        if not (math.isfinite(post_s) and post_s >= 0):
            raise ValueError(f"clip post_s must be >= 0, not {post_s}")
        if not (math.isfinite(max_s) and max_s > 0):
            raise ValueError(f"clip max_s must be > 0, not {max_s}")
        if max_frames < 1:
            raise ValueError(f"clip max_frames must be >= 1, not {max_frames}")
        self.pre_s = pre_s
        self.post_s = post_s
        self.max_s = max_s
        self.max_frames = max_frames
        self.max_width = max_width
        self.alerts: list[int] = []  # monotonic times of the alerts this clip covers
        self.capped = False  # an extension (or the post-roll) was cut short by max_s
        self.dropped = 0  # frames refused because max_frames was reached
        self._frames: list[TimedImage] = []
        self._start_ns: int | None = None
        self._end_ns = 0
        self._finished = False

    @property
    def started(self) -> bool:
        return self._start_ns is not None

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def start_mono_ns(self) -> int:
        if self._start_ns is None:
            raise RuntimeError("clip builder has not been started")
        return self._start_ns

    @property
    def end_mono_ns(self) -> int:
        """Monotonic time up to which frames are taken (the last alert's post-roll, capped)."""
        return self._end_ns

    @property
    def frames(self) -> list[TimedImage]:
        """The clip's frames so far, oldest first (a new list)."""
        return list(self._frames)

    @property
    def bytes(self) -> int:
        return sum(image.nbytes for _, image in self._frames)

    def _cap_ns(self) -> int:
        return self.start_mono_ns + round(self.max_s * _NS)

    def start(self, alert_mono_ns: int, pre_roll: Iterable[TimedImage]) -> None:
        """Open the clip at an alert with the frames before it (e.g. `ring.snapshot_since(0)`)."""
        if self._start_ns is not None:
            raise RuntimeError("clip builder already started; extend() it or start a new one")
        earliest = alert_mono_ns - round(self.pre_s * _NS)
        kept = [(ns, image) for ns, image in pre_roll if earliest <= ns <= alert_mono_ns]
        kept.sort(key=lambda item: item[0])
        self._start_ns = kept[0][0] if kept else alert_mono_ns
        self.alerts.append(alert_mono_ns)
        self._end_ns = self._capped_end(alert_mono_ns + round(self.post_s * _NS))
        for ns, image in kept:
            self._append(ns, image)
        if self._frames and self._frames[-1][0] >= self._end_ns:
            self._finished = True

    def _capped_end(self, wanted: int) -> int:
        cap = self._cap_ns()
        if wanted > cap:
            self.capped = True
            return cap
        return wanted

    def _append(self, mono_ns: int, image: Image) -> None:
        if self._frames and mono_ns <= self._frames[-1][0]:
            return  # the same frame again (the alert frame fed after start): keep one
        if len(self._frames) >= self.max_frames:
            self.dropped += 1
            self._finished = True
            return
        if self.max_width is not None and image.shape[1] > self.max_width:
            image = fit_width(image, self.max_width)
        self._frames.append((mono_ns, image))

    def feed(self, mono_ns: int, image: Image) -> bool:
        """Add a frame taken after the alert; returns `finished`.

        A frame at or after the end of the post-roll finishes the clip (one exactly at the end is
        kept, a later one is not).
        """
        if self._start_ns is None:
            raise RuntimeError("clip builder has not been started")
        if self._finished:
            return True
        if mono_ns <= self._end_ns:
            self._append(mono_ns, check_image(image, "clip frame"))
        if mono_ns >= self._end_ns:
            self._finished = True
        return self._finished

    def extend(self, until_mono_ns: int, *, alert_mono_ns: int | None = None) -> int:
        """Take frames up to `until_mono_ns` (not past `max_s` of clip); returns the new end.

        `alert_mono_ns` (the new alert's time) is recorded in `alerts` when given.
        """
        if self._start_ns is None:
            raise RuntimeError("clip builder has not been started")
        if self._finished:
            raise RuntimeError("clip builder has finished; start a new one for a later alert")
        if alert_mono_ns is not None:
            self.alerts.append(alert_mono_ns)
        self._end_ns = max(self._end_ns, self._capped_end(until_mono_ns))
        return self._end_ns

    def stop(self) -> None:
        """Finish now with the frames so far (the camera ended, or the daemon is stopping)."""
        if self._start_ns is None:
            raise RuntimeError("clip builder has not been started")
        self._finished = True


class ClipRecorder:
    """Clips of one camera: the pre-roll ring plus at most one open clip at a time.

    Every frame goes through `add()`; an alert calls `alert()`, which opens a clip or extends
    the open one, so overlapping alerts share one clip. `add()` returns the clips that are
    complete (usually none); the caller writes them with `write_clip` (in a worker thread).
    """

    def __init__(self, settings: ClipSettings, camera_fps: float) -> None:
        if not (math.isfinite(camera_fps) and camera_fps > 0):
            raise ValueError(f"camera_fps must be > 0, not {camera_fps}")
        self.settings = settings
        # Room for the pre-roll at the camera's rate, with slack for jittery timestamps.
        max_frames = max(2, math.ceil(settings.pre * camera_fps * 1.5) + 2)
        self.ring = FrameRing(settings.pre, max_frames, settings.max_width)
        self.clip_max_frames = min(MAX_CLIP_FRAMES, math.ceil(MAX_CLIP_S * camera_fps * 1.5) + 2)
        self._open: ClipBuilder | None = None
        # A clip can complete inside alert() (no post-roll, or the frame cap): it waits here for
        # the next add() or flush() to hand it over, so none is lost.
        self._done: list[ClipBuilder] = []

    @property
    def open_clip(self) -> ClipBuilder | None:
        return self._open

    def _take_done(self) -> list[ClipBuilder]:
        done, self._done = self._done, []
        return done

    def add(self, mono_ns: int, image: Image) -> list[ClipBuilder]:
        """Keep the frame for pre-roll and feed the open clip; returns the clips now complete."""
        stored = self.ring.add(mono_ns, image)
        builder = self._open
        if builder is not None and builder.feed(mono_ns, stored):
            self._open = None
            self._done.append(builder)
        return self._take_done()

    def alert(self, alert_mono_ns: int) -> ClipBuilder:
        """Open a clip at this alert, or extend the open one to cover it; returns the clip."""
        until = alert_mono_ns + round(self.settings.post * _NS)
        builder = self._open
        if builder is not None and not builder.finished:
            builder.extend(until, alert_mono_ns=alert_mono_ns)
            return builder
        if builder is not None:
            self._done.append(builder)
        builder = ClipBuilder(
            self.settings.pre,
            self.settings.post,
            max_frames=self.clip_max_frames,
            max_width=self.settings.max_width,
        )
        builder.start(alert_mono_ns, self.ring.snapshot_since(0))
        self._open = builder
        return builder

    def flush(self) -> list[ClipBuilder]:
        """Finish the open clip now (end of a file, shutdown); returns the clips not yet taken."""
        builder, self._open = self._open, None
        if builder is not None:
            builder.stop()
            self._done.append(builder)
        return self._take_done()
