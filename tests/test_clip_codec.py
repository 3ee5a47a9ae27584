"""The clip codec: H.264 by libx264 through PyAV, chosen once with one log line and nothing from
FFmpeg on the console; MPEG-4 Part 2 (`mp4v`) where the config asks for it or, with one warning,
where PyAV or libx264 is missing; the config's words for a bad CRF, preset or codec; and a camera
that goes on analysing frames while its clip is encoded in the clip thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import appliance.stages.vision
import inference.clips
from appliance.stages.recorder import Recorder
from appliance.stages.vision import CameraPipeline, quiet_opencv
from config import Camera, ClipSettings, ConfigError, DetectorModel, parse_config
from inference.clips import ClipInfo, reset_codec_choice
from inference.detect import open_detector
from inference.media import TimedImage
from inference.session import ModelError
from sensors.camera import CameraSource, builtin_footage
from sync import Journal, PayloadStore, Priority
from sync.reader import JournalReader
from tests.helpers import ROOT, cli_env, component_missing, wait_until

# What FFmpeg or x264 write themselves ("[libx264 @ 0x55...] using cpu capabilities", "x264
# [info]: ...") and what OpenCV's own logger writes ("[ERROR:0@0.025] global ...", "[ WARN:0@").
FOREIGN_LINE = re.compile(r"^(\[(\w+ @ 0x[0-9a-f]+|\s*(ERROR|WARN|INFO)\b)|x264 \[)")

# A process like the daemon: the product's JSON log on stderr, then two clips written the way a
# camera writes them (the first write_clip chooses the codec). argv[2] "no-av": PyAV cannot be
# imported in it (None in sys.modules makes `import av` raise ImportError), as on a box without.
PROGRAM = """
import sys
from pathlib import Path
import numpy as np
if sys.argv[2] == "no-av":
    sys.modules["av"] = None
from appliance.runtime.logs import setup_logging
from inference.clips import write_clip

setup_logging(json_lines=True)
frames = [(i * 200_000_000, np.full((48, 64, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
for name in ("a.mp4", "b.mp4"):
    info = write_clip(frames, None, Path(sys.argv[1]) / name)
print(info.fourcc, info.frames)
"""


def run_program(folder: Path, mode: str) -> tuple[str, list[dict[str, Any]]]:
    """The program's stdout and its log entries, having checked every stderr line is the
    product's own JSON log."""
    # A daemon started earlier in this test process set OPENCV_FFMPEG_IS_THREAD_SAFE in its
    # environment (sensors.capture); this program gets the environment a fresh command has.
    env = {k: v for k, v in cli_env().items() if k != "OPENCV_FFMPEG_IS_THREAD_SAFE"}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(folder), mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert not [line for line in lines if FOREIGN_LINE.match(line)], done.stderr
    return done.stdout.strip(), [json.loads(line) for line in lines]


def test_clips_are_h264_chosen_once_without_a_word_from_ffmpeg(tmp_path: Path) -> None:
    out, entries = run_program(tmp_path, "with-av")
    # PyAV is a dependency of the appliance: its wheel's FFmpeg has libx264.
    assert out == "avc1 5"
    chosen = [e for e in entries if e.get("codec") is not None]
    assert len(chosen) == 1, entries  # two clips, one line
    assert chosen[0]["codec"] == "avc1" and chosen[0]["level"] == "info"
    assert chosen[0]["logger"] == "inference.clips"
    assert "H.264" in chosen[0]["msg"]
    # The file is what a browser gets: an MP4 whose index (moov) comes before its media data.
    data = (tmp_path / "b.mp4").read_bytes()
    assert b"avc1" in data and 0 < data.find(b"moov") < data.find(b"mdat")


def test_without_pyav_clips_are_mp4v_with_one_warning_that_says_why(tmp_path: Path) -> None:
    out, entries = run_program(tmp_path, "no-av")
    assert out == "mp4v 5"  # written and read back with every frame all the same
    chosen = [e for e in entries if e.get("codec") is not None]
    assert len(chosen) == 1, entries
    assert chosen[0]["level"] == "warning" and chosen[0]["codec"] == "mp4v"
    assert "PyAV is not installed" in chosen[0]["msg"]
    assert "pip install 'av>=14'" in chosen[0]["msg"]
    assert "browsers and the status page do not" in chosen[0]["msg"]


def test_an_ffmpeg_without_libx264_is_named_and_clips_fall_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # The probe, pointed at an encoder this FFmpeg lacks, as a build without libx264 would be.
    missing = inference.clips._probe_x264("libx264-not-built")
    assert missing == (False, "PyAV's FFmpeg has no libx264-not-built encoder")
    monkeypatch.setattr(inference.clips, "_probe_x264", lambda: missing)
    reset_codec_choice()
    try:
        frames: Sequence[TimedImage] = [
            (i * 100_000_000, image) for i, image in enumerate(_frames(3))
        ]
        with caplog.at_level("INFO", logger="inference.clips"):
            info = inference.clips.write_clip(frames, None, tmp_path / "clip.mp4")
            inference.clips.write_clip(frames, None, tmp_path / "again.mp4")
        assert info.fourcc == "mp4v" and info.frames == 3
        said = [r for r in caplog.records if r.name == "inference.clips"]
        assert [r.levelname for r in said] == ["WARNING"]
        assert "no libx264-not-built encoder" in said[0].getMessage()
    finally:
        reset_codec_choice()


def test_mp4v_is_kept_when_the_config_asks_for_it(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    reset_codec_choice()
    frames = [(i * 100_000_000, image) for i, image in enumerate(_frames(3))]
    with caplog.at_level("INFO", logger="inference.clips"):
        info = inference.clips.write_clip(
            frames, None, tmp_path / "clip.mp4", ClipSettings(codec="mp4v")
        )
    assert info.fourcc == "mp4v"
    said = [r for r in caplog.records if r.name == "inference.clips"]
    assert [r.levelname for r in said] == ["INFO"]
    assert "as clip.codec asks" in said[0].getMessage()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("crf: 60", "cameras[0].clip.crf: must be at most 51, not 60"),
        ("crf: -1", "cameras[0].clip.crf: must be at least 0, not -1"),
        ("preset: superslow", "clip.preset: must be one of ultrafast, superfast, veryfast, "),
        ("codec: h265", "cameras[0].clip.codec: must be one of h264 or mp4v, not 'h265'"),
        ("threads: 0", "cameras[0].clip.threads: must be at least 1, not 0"),
    ],
)
def test_bad_clip_settings_are_refused_in_the_configs_words(setting: str, message: str) -> None:
    text = (
        "appliance:\n  id: t-1\n  data_dir: /tmp/x\n"
        "cameras:\n  - name: deck\n    url: builtin:bikes\n    clip:\n"
        f"      {setting}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, file="c.yaml", environ={})
    assert message in str(caught.value)
    assert str(caught.value).startswith("c.yaml:8:")


def test_clip_defaults_suit_a_small_cpu_only_box() -> None:
    clip = ClipSettings()
    assert (clip.codec, clip.crf, clip.preset, clip.threads) == ("h264", 28, "faster", 1)


def _frames(count: int) -> list[Any]:
    import cv2
    import numpy as np

    capture = cv2.VideoCapture(str(_footage("bikes")))
    try:
        out = []
        for _ in range(count):
            ok, image = capture.read()
            assert ok
            out.append(np.asarray(image, dtype=np.uint8))
        return out
    finally:
        capture.release()


def _footage(name: str) -> Path:
    try:
        return builtin_footage(name)
    except ValueError as exc:
        component_missing(str(exc))


# ---------------------------------------------------------------- the camera's clip thread


async def test_the_camera_keeps_analysing_frames_while_its_clip_is_encoded(
    monkeypatch: pytest.MonkeyPatch,
    journal: Journal,
    payload_store: PayloadStore,
    data_dir: Path,
) -> None:
    """The real pipeline on builtin:vtest with the real detector and a zone along the kerb; the
    clip writer is held at its start (a stand-in for a slow encode) until the camera has
    analysed more frames, then let go: the clip is journalled after all, as H.264."""
    _footage("vtest")
    quiet_opencv()
    try:
        detector = await asyncio.to_thread(open_detector, DetectorModel(), "detector")
    except ModelError as exc:
        component_missing(f"the built-in detector ({exc})")
    entered = threading.Event()
    release = threading.Event()
    writer_threads: list[str] = []
    real_write_clip = inference.clips.write_clip

    def held_write_clip(
        frames: Sequence[TimedImage], fps: float | None, path: Path, settings: ClipSettings
    ) -> ClipInfo:
        writer_threads.append(threading.current_thread().name)
        entered.set()
        release.wait(60)  # bounded: a stuck test fails below instead of hanging
        return real_write_clip(frames, fps, path, settings)

    monkeypatch.setattr(appliance.stages.vision, "write_clip", held_write_clip)
    camera = Camera.model_validate(
        {
            "name": "street",
            "url": "builtin:vtest",
            "pace": "fast",
            "classes": ["person"],
            "zones": [{"name": "kerb", "polygon": [[0, 0.3], [1, 0.3], [1, 1], [0, 1]]}],
            "clip": {"pre": "1s", "post": "1s"},
            "motion": {"enabled": False},
        }
    )
    scratch = data_dir / "scratch"
    scratch.mkdir()
    pipeline = CameraPipeline(
        camera,
        CameraSource(camera),
        detector,
        Recorder("street", journal, payload_store),
        scratch_dir=scratch,
    )
    task = asyncio.create_task(pipeline.run(), name="camera:street")
    try:
        await wait_until(entered.is_set, "a clip handed to the clip thread", within_s=60)
        analysed = pipeline.stats.analysed
        await wait_until(
            lambda: pipeline.stats.analysed >= analysed + 5,
            "the camera analysing frames while its clip is held",
            within_s=30,
        )
        assert pipeline.stats.clips == 0  # still held: nothing journalled yet
        release.set()
        await wait_until(lambda: pipeline.stats.clips >= 1, "the clip journalled", within_s=30)
    finally:
        release.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await detector.aclose()
    assert writer_threads[0].startswith("clip-street")  # the camera's own clip thread
    assert pipeline.stats.clip_encode_cpu_s > 0
    with JournalReader.open(journal.data_dir) as reader:
        clips = [r for r in reader.recent((Priority.ALERT,), 50) if r.kind == "clip"]
        assert clips, "no clip record"
        body = clips[-1].body
        assert body["codec"] == "avc1" and body["frames"] >= 2
        (sha,) = clips[-1].payloads
        assert reader.payload_info([sha])[sha][1] == "video/mp4"
