"""Benchmark: alert clips as H.264 (libx264 through PyAV, the default) against MPEG-4 Part 2
(`mp4v`, OpenCV's writer, what clips were before), on the same frames.

  footage   builtin:vtest (pedestrians, 768x576 at 10 fps, 79.5 s) and builtin:bikes (cyclists,
            640x272 at 25 fps, 10 s), taken at the camera's default rate (--fps 5) and shrunk to
            the clip's default max_width (640) as ClipRecorder does, cut into clips of --seconds
            (10: the default pre + post roll). --quick: one 4 s clip of each.
  encode    every clip through inference.clips.write_clip, the appliance's own path (temp file,
            fsync, read-back check), as mp4v (the baseline) and as H.264 at the configured
            defaults (clip.crf, clip.preset, clip.threads). Encode CPU = the process's CPU time
            around write_clip less that of decoding the written file once more (the read-back
            check decodes it), per second of video: the CPU share one camera's clips cost while
            they are being written. The writer thread's own CPU time (ClipInfo.encode_cpu_s) is
            reported beside it.
  quality   each written clip decoded by OpenCV and compared frame by frame with the frames that
            went in: PSNR over the BGR pixels (from the mean squared error of the whole clip)
            and SSIM (Wang et al. 2004: grey levels, Gaussian window sigma 1.5, K1 0.01,
            K2 0.03), the mean over frames.
  matched   the largest CRF (fewest bytes) whose H.264 SSIM is at least mp4v's on the same
            clips, found by bisection over CRF 0..51, and its bytes against mp4v's.

Target: H.264 at the defaults reaches at least mp4v's SSIM in at most 1/3 of its bytes.

Prints one JSON object on stdout; progress on stderr. `python -m bench.clip_codec [--quick]`."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from bench.common import base_parser, emit, machine, make_data_root, progress, source_fingerprint
from config.cameras import ClipSettings
from inference.clips import H264, MP4V, count_frames, reset_codec_choice, write_clip
from inference.media import fit_width
from sensors.capture import builtin_footage

Image = npt.NDArray[np.uint8]
TARGET_RATIO = 1 / 3
_NS = 1_000_000_000
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


# ---------------------------------------------------------------------------- measures


def ssim(a: Image, b: Image) -> float:
    """Mean SSIM of two BGR (or grey) images of one size: Wang et al. 2004, grey levels, an
    11x11 Gaussian window of sigma 1.5."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one size, not {a.shape} and {b.shape}")
    x = (cv2.cvtColor(a, cv2.COLOR_BGR2GRAY) if a.ndim == 3 else a).astype(np.float64)
    y = (cv2.cvtColor(b, cv2.COLOR_BGR2GRAY) if b.ndim == 3 else b).astype(np.float64)

    def blur(image: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(cv2.GaussianBlur(image, (11, 11), 1.5), dtype=np.float64)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + _C1) * (2 * cov + _C2)
    den = (mu_x * mu_x + mu_y * mu_y + _C1) * (var_x + var_y + _C2)
    return float(np.mean(num / den))


def psnr(squared_error: float, samples: int) -> float:
    """PSNR in dB of 8-bit samples from their summed squared error (inf for identical)."""
    mse = squared_error / samples
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def decoded_frames(path: Path) -> list[Image]:
    capture = cv2.VideoCapture(str(path))
    try:
        frames: list[Image] = []
        while True:
            ok, image = capture.read()
            if not ok:
                return frames
            frames.append(np.asarray(image, dtype=np.uint8))
    finally:
        capture.release()


# ------------------------------------------------------------------------------ footage


@dataclass
class Footage:
    name: str
    source: str
    clips: list[list[tuple[int, Image]]]
    fps: float

    @property
    def size(self) -> tuple[int, int]:
        height, width = self.clips[0][0][1].shape[:2]
        return width & ~1, height & ~1


def cut(name: str, fps: float, seconds: float, max_width: int, limit: int | None) -> Footage:
    """The footage at `fps` (every n-th frame, by the file's time), shrunk to `max_width`, in
    clips of `seconds` (a last shorter piece is left out); `limit`: at most that many clips."""
    path = builtin_footage(name)
    capture = cv2.VideoCapture(str(path))
    native = capture.get(cv2.CAP_PROP_FPS) or fps
    per_clip = max(2, round(seconds * fps))
    clips: list[list[tuple[int, Image]]] = []
    taken: list[tuple[int, Image]] = []
    index = 0
    next_at = 0.0
    try:
        while limit is None or len(clips) < limit:
            ok, image = capture.read()
            if not ok:
                break
            at = index / native
            index += 1
            if at + 1e-9 < next_at:
                continue
            next_at += 1 / fps
            taken.append((round(at * _NS), fit_width(np.asarray(image, np.uint8), max_width)))
            if len(taken) == per_clip:
                clips.append(taken)
                taken = []
    finally:
        capture.release()
    if not clips:
        raise SystemExit(f"builtin:{name} ({path}) is shorter than one {seconds:g} s clip")
    return Footage(name=f"builtin:{name}", source=str(path), clips=clips, fps=fps)


# ------------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    """One codec's clips of one footage, summed."""

    clips: int = 0
    frames: int = 0
    video_s: float = 0.0
    bytes: int = 0
    encode_cpu_s: float = 0.0
    thread_cpu_s: float = 0.0
    squared_error: float = 0.0
    samples: int = 0
    ssims: list[float] = field(default_factory=list)
    fourcc: str = ""

    @property
    def ssim(self) -> float:
        return sum(self.ssims) / len(self.ssims)

    def result(self) -> dict[str, Any]:
        return {
            "fourcc": self.fourcc,
            "clips": self.clips,
            "bytes_per_clip": round(self.bytes / self.clips),
            "kbit_per_s": round(self.bytes * 8 / self.video_s / 1000, 1),
            "psnr_db": round(psnr(self.squared_error, self.samples), 2),
            "ssim": round(self.ssim, 4),
            "encode_cpu_s_per_video_s": round(self.encode_cpu_s / self.video_s, 4),
            "encode_cpu_ms_per_frame": round(self.encode_cpu_s / self.frames * 1000, 2),
            "writer_thread_cpu_s_per_video_s": round(self.thread_cpu_s / self.video_s, 4),
        }


def encode(footage: Footage, settings: ClipSettings, work: Path) -> Encoded:
    out = Encoded()
    width, height = footage.size
    for number, frames in enumerate(footage.clips):
        path = work / f"clip-{number}.mp4"
        started = time.process_time()
        info = write_clip(frames, None, path, settings)
        written = time.process_time() - started
        started = time.process_time()
        count_frames(path)  # what write_clip's read-back check cost, taken off its CPU
        out.encode_cpu_s += max(0.0, written - (time.process_time() - started))
        out.thread_cpu_s += info.encode_cpu_s
        out.fourcc = info.fourcc
        decoded = decoded_frames(path)
        if len(decoded) != len(frames):
            raise SystemExit(f"{path}: {len(decoded)} frames decoded, {len(frames)} written")
        for (_, source), back in zip(frames, decoded, strict=True):
            original = source[:height, :width]
            diff = original.astype(np.float64) - back.astype(np.float64)
            out.squared_error += float(np.sum(diff * diff))
            out.samples += diff.size
            out.ssims.append(ssim(original, back))
        out.clips += 1
        out.frames += len(frames)
        out.video_s += info.duration_s
        out.bytes += info.bytes
        path.unlink()
    return out


def matched_crf(
    footage: Footage, base: ClipSettings, target_ssim: float, work: Path
) -> tuple[int, Encoded] | None:
    """The largest CRF whose clips reach `target_ssim` (SSIM falls as CRF rises), or None when
    even CRF 0 does not."""
    low, high = 0, 51
    best: tuple[int, Encoded] | None = None
    while low <= high:
        crf = (low + high) // 2
        encoded = encode(footage, base.model_copy(update={"crf": crf}), work)
        progress(f"  {footage.name} crf {crf}: ssim {encoded.ssim:.4f}, {encoded.bytes} bytes")
        if encoded.ssim >= target_ssim:
            best = (crf, encoded)
            low = crf + 1
        else:
            high = crf - 1
    return best


def measure(footage: Footage, settings: ClipSettings, work: Path) -> dict[str, Any]:
    progress(f"{footage.name}: {len(footage.clips)} clips, {footage.size[0]}x{footage.size[1]}")
    mp4v = encode(footage, settings.model_copy(update={"codec": "mp4v"}), work)
    h264 = encode(footage, settings, work)
    if (mp4v.fourcc, h264.fourcc) != (MP4V, H264):
        raise SystemExit(f"expected mp4v and avc1 clips, wrote {mp4v.fourcc} and {h264.fourcc}")
    matched = matched_crf(footage, settings, mp4v.ssim, work)
    ratio = h264.bytes / mp4v.bytes
    return {
        "footage": footage.name,
        "file": footage.source,
        "clips": len(footage.clips),
        "clip_s": round(mp4v.video_s / mp4v.clips, 2),
        "fps": footage.fps,
        "size": list(footage.size),
        "mp4v": mp4v.result(),
        "h264": h264.result(),
        "h264_bytes_ratio": round(ratio, 4),
        "h264_ssim_minus_mp4v": round(h264.ssim - mp4v.ssim, 4),
        "matched": None
        if matched is None
        else {
            "crf": matched[0],
            **matched[1].result(),
            "bytes_ratio": round(matched[1].bytes / mp4v.bytes, 4),
        },
        "target_met": h264.ssim >= mp4v.ssim and ratio <= TARGET_RATIO,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "clip codecs")
    parser.add_argument("--fps", type=float, default=5.0, help="camera rate (default 5)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    parser.add_argument(
        "--footage", nargs="+", default=["vtest", "bikes"], help="builtin footage names"
    )
    args = parser.parse_args()
    settings = ClipSettings()
    seconds = 4.0 if args.quick else args.seconds
    limit = 1 if args.quick else None
    work = make_data_root(args.tmp_dir, "bench-clip-codec-")
    reset_codec_choice()
    try:
        results = [
            measure(cut(name, args.fps, seconds, settings.max_width, limit), settings, work)
            for name in args.footage
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(
        {
            "benchmark": "clip_codec",
            "quick": args.quick,
            "machine": machine(work.parent),
            "source": source_fingerprint("inference/clips.py", "config/cameras.py"),
            "settings": {
                "crf": settings.crf,
                "preset": settings.preset,
                "threads": settings.threads,
                "max_width": settings.max_width,
                "fps": args.fps,
                "clip_s": seconds,
            },
            "target": {
                "bytes_ratio_max": round(TARGET_RATIO, 4),
                "met": {r["footage"]: r["target_met"] for r in results},
            },
            "footage": results,
            # The run checked itself (every clip decoded with every frame, each codec the one
            # asked for; it exits otherwise); whether the target is met is `target.met`.
            "ok": True,
        }
    )


if __name__ == "__main__":
    main()
