"""bench.clip_codec: its SSIM and PSNR on images whose answers are known by hand, and a --quick
run end to end whose JSON has every figure the benchmarks page quotes, each codec the one asked
for and every clip read back."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.clip_codec import psnr, ssim

ROOT = Path(__file__).resolve().parents[1]
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def test_ssim_of_known_images() -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    assert ssim(image, image) == pytest.approx(1.0)
    # Two flat greys: no variance, so only the luminance term is left, computable by hand.
    a, b = np.full((32, 32), 100, np.uint8), np.full((32, 32), 110, np.uint8)
    assert ssim(a, b) == pytest.approx((2 * 100 * 110 + C1) / (100**2 + 110**2 + C1))
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    # More noise, less similar.
    noisy = [
        np.clip(image.astype(np.int16) + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)
        for sigma in (2, 10, 40)
    ]
    scores = [ssim(image, n) for n in noisy]
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0
    with pytest.raises(ValueError, match="one size"):
        ssim(image, image[:10])


def test_psnr_from_the_squared_error() -> None:
    assert psnr(0.0, 100) == math.inf
    # Every sample off by 1: MSE 1, PSNR 20 log10(255).
    assert psnr(100.0, 100) == pytest.approx(20 * math.log10(255))


def test_a_quick_run_prints_one_json_object_with_both_codecs_measured(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.clip_codec", "--quick", f"--tmp-dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["benchmark"] == "clip_codec" and result["quick"] is True
    assert result["ok"] is True
    assert result["settings"]["crf"] == 28 and result["settings"]["preset"] == "faster"
    assert set(result["target"]["met"]) == {"builtin:vtest", "builtin:bikes"}
    for footage in result["footage"]:
        assert footage["clips"] == 1 and footage["clip_s"] == pytest.approx(4.0)
        assert footage["mp4v"]["fourcc"] == "mp4v" and footage["h264"]["fourcc"] == "avc1"
        for codec in ("mp4v", "h264"):
            figures = footage[codec]
            assert figures["bytes_per_clip"] > 0
            assert 25 < figures["psnr_db"] < 60 and 0.8 < figures["ssim"] < 1
            assert figures["encode_cpu_s_per_video_s"] > 0
        assert footage["h264_bytes_ratio"] == pytest.approx(
            footage["h264"]["bytes_per_clip"] / footage["mp4v"]["bytes_per_clip"], rel=1e-3
        )
        matched = footage["matched"]
        assert matched is not None and 0 <= matched["crf"] <= 51
        assert matched["ssim"] >= footage["mp4v"]["ssim"]
    assert list(tmp_path.iterdir()) == []  # its clips are gone
