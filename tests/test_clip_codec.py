"""The clip codec is chosen without FFmpeg writing to the console: the probe's complaints about
encoders it cannot use stay in its child process, and one log line says which codec clips use."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import inference.media
from tests.helpers import ROOT, cli_env

# What FFmpeg writes itself ("[h264_v4l2m2m @ 0x55...] Could not find a valid device") and what
# OpenCV's own logger writes ("[ERROR:0@0.025] global cap_ffmpeg_impl.hpp:...", "[ WARN:0@...").
FOREIGN_LINE = re.compile(r"^\[(\w+ @ 0x[0-9a-f]+|\s*(ERROR|WARN|INFO)\b)")

# A process like the daemon: the product's JSON log on stderr, then a clip written the way a
# camera writes one (the first write_clip probes the codec).
PROGRAM = """
import sys
from pathlib import Path
import numpy as np
from appliance.runtime.logs import setup_logging
from inference.media import write_clip

setup_logging(json_lines=True)
frames = [(i * 200_000_000, np.full((48, 64, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
info = write_clip(frames, None, Path(sys.argv[1]))
print(info.fourcc)
"""


def test_the_codec_probe_writes_nothing_to_the_console_and_logs_the_codec_once(
    tmp_path: Path,
) -> None:
    # A daemon started earlier in this test process set OPENCV_FFMPEG_IS_THREAD_SAFE in its
    # environment (sensors.capture), and a daemon also quiets OpenCV's own warnings about it;
    # this program is neither, so it gets the environment a fresh `appliance` command has.
    env = {k: v for k, v in cli_env().items() if k != "OPENCV_FFMPEG_IS_THREAD_SAFE"}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path / "clip.mp4")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    codec = done.stdout.strip()
    assert codec in {"avc1", "mp4v"}
    lines = done.stderr.splitlines()
    assert not [line for line in lines if FOREIGN_LINE.match(line)], done.stderr
    # Everything on stderr is the product's own log: JSON lines, and one of them names the codec.
    entries = [json.loads(line) for line in lines]
    chosen = [e for e in entries if e.get("codec") is not None]
    assert len(chosen) == 1, entries
    assert chosen[0]["codec"] == codec
    assert chosen[0]["logger"] == "inference.media"
    assert codec in chosen[0]["msg"]
    if codec == "mp4v":
        assert "no usable H.264 encoder" in chosen[0]["msg"]
        assert "browsers" in chosen[0]["msg"]


def test_a_probe_that_hangs_is_given_up_on_and_clips_stay_mp4v(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hardware encoder whose open never returns: the child is killed at the timeout and the
    # appliance goes on with the codec every OpenCV build has.
    monkeypatch.setattr(inference.media, "_PROBE", "import time; time.sleep(60)")
    monkeypatch.setattr(inference.media, "PROBE_TIMEOUT_S", 0.5)
    h264, why = inference.media._probe_avc1()
    assert (h264, why) == (False, "the H.264 probe did not finish in 0.5 s")


def test_a_probe_that_crashes_names_its_exit_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference.media, "_PROBE", "import os; os.abort()")
    h264, why = inference.media._probe_avc1()
    assert not h264
    assert why.startswith("the H.264 probe exited with -"), why
