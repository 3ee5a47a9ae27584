"""Clip files: an alert's frames as an MP4 that reads back with every frame, in H.264 (libx264
through PyAV: `yuv420p`, `+faststart`, the camera's `clip.crf` and `clip.preset`), which browsers
and the status page play, or in OpenCV's MPEG-4 Part 2 (`mp4v`) where `clip.codec` asks for it or
where PyAV or its libx264 is missing; and the choice between them, made once per process and
said in one log line.

Synchronous CPU and file work with no event loop in sight: the camera pipeline runs it in its
own clip thread. Nothing here touches the journal; the caller stores the file.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np

from config.cameras import ClipSettings
from inference.media import ClipWriteError, Image, TimedImage, check_image

log = logging.getLogger(__name__)

H264 = "avc1"  # the fourccs clips are written with (and their records' `codec`)
MP4V = "mp4v"
# 90 kHz, MPEG's clock: fine enough that frames a millisecond apart keep distinct times.
TIME_BASE = Fraction(1, 90_000)
# OpenCV's conversion below is BT.601 in limited range: say so in the stream, so a player does
# not guess BT.709 for an HD clip and shift its colours.
_X264_PARAMS = "colorprim=smpte170m:transfer=smpte170m:colormatrix=smpte170m"
_NS = 1_000_000_000

_probe_lock = threading.Lock()
_probed: tuple[bool, str] | None = None
_said: set[str] = set()  # the codec lines logged in this process (each once)


@dataclass(frozen=True, slots=True)
class ClipInfo:
    """What write_clip wrote (checked by reading the file back)."""

    path: Path
    frames: int
    width: int
    height: int
    fps: float  # the given rate, or the median of the frames' timestamps
    duration_s: float
    fourcc: str
    bytes: int
    start_mono_ns: int
    end_mono_ns: int
    encode_cpu_s: float  # CPU time of the encoding thread, conversion and muxing included


# --------------------------------------------------------------------------- the codec


def _probe_x264(encoder: str = "libx264") -> tuple[bool, str]:
    """Whether PyAV is there and its FFmpeg opens `encoder`, and if not, why not.

    In-process: libx264 is a software encoder with nothing to hang on (unlike the hardware
    H.264 encoders OpenCV's FFmpeg offers), and PyAV keeps FFmpeg's own log quiet unless asked.
    """
    try:
        import av
    except ImportError as exc:
        return False, f"PyAV is not installed ({exc}); install it with pip install 'av>=14'"
    try:
        context = av.CodecContext.create(encoder, "w")
        if not isinstance(context, av.VideoCodecContext):
            return False, f"{encoder} is not a video encoder"
        context.width, context.height, context.pix_fmt = 64, 48, "yuv420p"
        context.time_base = TIME_BASE
        context.open()
    except av.FFmpegError as exc:
        return False, f"PyAV's FFmpeg cannot open {encoder} ({exc})"
    except ValueError:  # UnknownCodecError: this FFmpeg was built without it
        return False, f"PyAV's FFmpeg has no {encoder} encoder"
    return True, ""


def _say_once(key: str, level: int, message: str, fourcc: str) -> None:
    if key not in _said:
        _said.add(key)
        log.log(level, message, extra={"fields": {"codec": fourcc}})


def clip_fourcc(codec: str = "h264") -> str:
    """The fourcc clips of `clip.codec` are written with: `avc1` (H.264) where libx264 is there,
    else `mp4v`. Probed once per process; one log line says which codec clips use (a warning,
    saying why, when `h264` falls back)."""
    global _probed
    with _probe_lock:
        if codec == "mp4v":
            _say_once(
                "mp4v",
                logging.INFO,
                "clips are MPEG-4 Part 2 (mp4v) MP4s, as clip.codec asks: VLC and ffmpeg play "
                "them, browsers and the status page do not",
                MP4V,
            )
            return MP4V
        if codec != "h264":
            raise ValueError(f"clip codec must be h264 or mp4v, not {codec!r}")
        if _probed is None:
            _probed = _probe_x264()
        usable, why = _probed
        if usable:
            _say_once("h264", logging.INFO, "clips are H.264 (avc1) MP4s, by libx264", H264)
            return H264
        _say_once(
            "fallback",
            logging.WARNING,
            f"clips are MPEG-4 Part 2 (mp4v) MP4s, not H.264: {why}. VLC and ffmpeg play them, "
            "browsers and the status page do not",
            MP4V,
        )
        return MP4V


def reset_codec_choice() -> None:
    """Forget the probe and the lines said (tests that make the encoder go missing)."""
    global _probed
    with _probe_lock:
        _probed = None
        _said.clear()


# -------------------------------------------------------------------------- the frames


def clip_fps(frames: Sequence[TimedImage]) -> float:
    """Frame rate from the median interval between the frames' monotonic times.

    The median shrugs off the odd late frame or gap. Raises ValueError with fewer than two
    frames or timestamps that do not increase.
    """
    if len(frames) < 2:
        raise ValueError("the frame rate of fewer than two frames is unknown; pass fps")
    intervals = [b[0] - a[0] for a, b in pairwise(frames)]
    if any(step <= 0 for step in intervals):
        raise ValueError("clip frame timestamps must strictly increase")
    return _NS / statistics.median(intervals)


def _timestamps(frames: Sequence[TimedImage], fps: float | None) -> list[int]:
    """Presentation times in TIME_BASE units: the frames' own monotonic times (a dropped frame
    shows as the pause it was) or, with `fps`, a steady rate."""
    if fps is not None:
        return [round(i / (fps * TIME_BASE)) for i in range(len(frames))]
    first = frames[0][0]
    out: list[int] = []
    for ns, _ in frames:
        at = round((ns - first) / (_NS * TIME_BASE))
        out.append(at if not out or at > out[-1] else out[-1] + 1)
    return out


def _fitted(image: Image, width: int, height: int) -> Image:
    """The frame at the clip's even size: an odd last row or column is cropped (no resampling
    of the picture for one pixel); a frame of another size is resized."""
    if height <= image.shape[0] <= height + 1 and width <= image.shape[1] <= width + 1:
        return np.ascontiguousarray(image[:height, :width])
    return np.asarray(
        cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA), dtype=np.uint8
    )


# ------------------------------------------------------------------------------ encoders


def _write_h264(
    frames: Sequence[TimedImage],
    pts: Sequence[int],
    fps: float,
    temp: Path,
    size: tuple[int, int],
    settings: ClipSettings,
) -> None:
    import av

    width, height = size
    with av.open(
        str(temp), mode="w", format="mp4", options={"movflags": "+faststart"}
    ) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = TIME_BASE
        stream.codec_context.options = {
            "crf": str(settings.crf),
            "preset": settings.preset,
            "threads": str(settings.threads),
            "x264-params": _X264_PARAMS,
        }
        for i, ((_, image), at) in enumerate(zip(frames, pts, strict=True)):
            fitted = _fitted(check_image(image, f"clip frame {i}"), width, height)
            # OpenCV converts (SIMD, without the GIL), so the camera's loop keeps running.
            yuv = np.asarray(cv2.cvtColor(fitted, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts, frame.time_base = at, TIME_BASE
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_mp4v(
    frames: Sequence[TimedImage], fps: float, temp: Path, path: Path, size: tuple[int, int]
) -> None:
    width, height = size
    writer = cv2.VideoWriter(str(temp), cv2.VideoWriter.fourcc(*MP4V), fps, size)
    try:
        if not writer.isOpened():
            raise ClipWriteError(path, f"OpenCV could not open an mp4v writer on {temp}")
        for i, (_, image) in enumerate(frames):
            writer.write(_fitted(check_image(image, f"clip frame {i}"), width, height))
    finally:
        writer.release()


def count_frames(path: Path) -> tuple[int, int, int]:
    """Frames, width and height of a video as OpenCV decodes it (0 frames if it cannot): a
    decoder apart from the encoder checks every clip."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return 0, 0, 0
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        count = 0
        while capture.grab():
            count += 1
        return count, width, height
    finally:
        capture.release()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_clip(
    frames: Sequence[TimedImage],
    fps: float | None,
    path: Path,
    settings: ClipSettings | None = None,
) -> ClipInfo:
    """Write the frames as an MP4 at `path` (temp file, fsync, rename) and check it reads back.

    The frame size is the first frame's rounded down to even numbers (yuv420p needs them); a
    frame of another size is resized to it. `fps` None: each frame at its own monotonic time
    (H.264) or at their median rate (mp4v, whose writer knows one rate only). `settings`: the
    camera's `clip` section (None: its defaults). Raises ValueError for bad input and
    ClipWriteError when the file cannot be written or does not read back with the frames
    written; no partial file is left at `path` either way.
    """
    settings = settings or ClipSettings()
    if not frames:
        raise ValueError("a clip needs at least one frame")
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"clip path must end in .mp4 (the container follows it), not {path}")
    rate = fps if fps is not None else clip_fps(frames) if len(frames) > 1 else 1.0
    if not (math.isfinite(rate) and 0 < rate <= 240):
        raise ValueError(f"clip fps must be in (0, 240], not {rate}")
    first = check_image(frames[0][1], "clip frame 0")
    height, width = first.shape[0] & ~1, first.shape[1] & ~1
    if width < 2 or height < 2:
        raise ValueError(f"clip frames are too small to encode ({first.shape[1]}x{first.shape[0]})")
    fourcc = clip_fourcc(settings.codec)
    pts = _timestamps(frames, rate if fps is not None or len(frames) < 2 else None)
    # The temp name keeps the .mp4 suffix: OpenCV picks the container from it.
    temp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp.mp4")
    try:
        # Creating the file ourselves turns a missing or read-only directory into a real OSError
        # (VideoWriter only says "not opened").
        with temp.open("xb"):
            pass
    except OSError as exc:
        raise ClipWriteError(path, f"cannot create a file in {path.parent}: {exc}") from exc
    try:
        started = time.thread_time()
        if fourcc == H264:
            _encode_h264(frames, pts, rate, temp, path, (width, height), settings)
        else:
            _write_mp4v(frames, rate, temp, path, (width, height))
        cpu_s = time.thread_time() - started
        with temp.open("rb") as handle:
            os.fsync(handle.fileno())
        count, read_width, read_height = count_frames(temp)
        if (count, read_width, read_height) != (len(frames), width, height):
            raise ClipWriteError(
                path,
                f"read back {count} frames of {read_width}x{read_height}, wrote {len(frames)} "
                f"of {width}x{height} (disk full or a broken encoder?)",
            )
        size = temp.stat().st_size
        temp.replace(path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise ClipWriteError(path, f"{exc}", retryable=True) from exc
    finally:
        temp.unlink(missing_ok=True)
    step = 1.0 / rate
    span = (pts[-1] - pts[0]) * float(TIME_BASE)
    return ClipInfo(
        path=path,
        frames=len(frames),
        width=width,
        height=height,
        fps=rate,
        duration_s=span + step if fourcc == H264 else len(frames) / rate,
        fourcc=fourcc,
        bytes=size,
        start_mono_ns=frames[0][0],
        end_mono_ns=frames[-1][0],
        encode_cpu_s=cpu_s,
    )


def _encode_h264(
    frames: Sequence[TimedImage],
    pts: Sequence[int],
    rate: float,
    temp: Path,
    path: Path,
    size: tuple[int, int],
    settings: ClipSettings,
) -> None:
    """_write_h264 with FFmpeg's errors in the clip's words (a full disk is worth a retry)."""
    import av

    try:
        _write_h264(frames, pts, rate, temp, size, settings)
    except av.FFmpegError as exc:
        raise ClipWriteError(
            path, f"the H.264 encoder failed: {exc}", retryable=isinstance(exc, OSError)
        ) from exc


__all__ = [
    "H264",
    "MP4V",
    "ClipInfo",
    "ClipWriteError",
    "clip_fourcc",
    "clip_fps",
    "count_frames",
    "reset_codec_choice",
    "write_clip",
]
