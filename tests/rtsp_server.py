"""A real RTSP server for tests: Debian's gst-rtsp-server, run by the system Python (python3-gi)
in a subprocess, serving a live H.264 test pattern on 127.0.0.1; it starts, stops and restarts on
the same port so a camera's reconnects can be tested."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.helpers import component_missing

SYSTEM_PYTHON = "/usr/bin/python3"
MOUNT = "test"
# What each GStreamer element used by the server comes from (Debian package names).
ELEMENT_PACKAGES = {
    "videotestsrc": "gstreamer1.0-plugins-base",
    "videoconvert": "gstreamer1.0-plugins-base",
    "x264enc": "gstreamer1.0-plugins-ugly",
    "rtph264pay": "gstreamer1.0-plugins-good",
}
BINDING_PACKAGES = "python3-gi gir1.2-gst-rtsp-server-1.0"

_CHECK_SCRIPT = """
import sys
try:
    import gi
    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import Gst, GstRtspServer
except (ImportError, ValueError) as exc:
    print(exc)
    sys.exit(3)
Gst.init(None)
missing = [name for name in sys.argv[1:] if Gst.ElementFactory.find(name) is None]
print(" ".join(missing))
sys.exit(4 if missing else 0)
"""

# argv: port, width, height, fps. Exits at SIGTERM (Python's default action: no handler is set).
_SERVER_SCRIPT = """
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer

port, width, height, fps = sys.argv[1:5]
Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
# A keyframe every second and SPS/PPS in-band: a client that (re)connects decodes within a second.
factory.set_launch(
    f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},"
    f"framerate={fps}/1 ! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast "
    f"threads=1 bitrate=400 key-int-max={fps} ! rtph264pay name=pay0 pt=96 config-interval=1 )"
)
factory.set_shared(True)
server.get_mount_points().add_factory("/MOUNT", factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on 127.0.0.1:{port}")
print(f"listening on 127.0.0.1:{port}", flush=True)
GLib.MainLoop().run()
""".replace("MOUNT", MOUNT)


def _clean_env() -> dict[str, str]:
    # The system Python must not pick up the test venv's paths.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@functools.cache
def missing_requirements() -> str | None:
    """What is missing to run the server, naming the Debian packages; None when all is there."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} is missing (Debian packages: python3 {BINDING_PACKAGES})"
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", _CHECK_SCRIPT, *ELEMENT_PACKAGES],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        check=False,
    )
    if result.returncode == 0:
        return None
    if result.returncode == 4:
        missing = result.stdout.split()
        packages = sorted({ELEMENT_PACKAGES[name] for name in missing})
        return (
            f"GStreamer elements {missing} are missing; install the Debian packages "
            f"{' '.join(packages)}"
        )
    detail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["(no output)"]
    return (
        f"gst-rtsp-server is not usable from {SYSTEM_PYTHON} ({detail[0]}); install the Debian "
        f"packages {BINDING_PACKAGES} {' '.join(sorted(set(ELEMENT_PACKAGES.values())))}"
    )


def require_rtsp_server() -> None:
    """Skip the test when the server cannot run here; under CI=true fail it instead."""
    problem = missing_requirements()
    if problem is None:
        return
    component_missing(f"what the RTSP test server needs ({problem})")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class RtspServer:
    """gst-rtsp-server on 127.0.0.1:`port` (a free one by default), serving `url`.

    Use as a context manager, or call start() / stop() / restart(); a restart keeps the port.
    The server's output goes to `log_path`, shown when it fails to start.
    """

    def __init__(
        self,
        log_path: Path,
        *,
        port: int | None = None,
        width: int = 320,
        height: int = 240,
        fps: int = 15,
    ) -> None:
        self.log_path = log_path
        self.port = port or free_port()
        self.width = width
        self.height = height
        self.fps = fps
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{MOUNT}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until its port accepts connections."""
        if self.running:
            return
        require_rtsp_server()
        args = [str(self.port), str(self.width), str(self.height), str(self.fps)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [SYSTEM_PYTHON, "-c", _SERVER_SCRIPT, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_clean_env(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if _accepts(self.port):
                return
            time.sleep(0.05)
        code = self._process.poll()
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        pytest.fail(
            f"RTSP server on port {self.port} did not start within {timeout}s "
            f"(exit code {code}):\n{tail}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until its port is closed."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while _accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
