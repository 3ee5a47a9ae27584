"""The reference receiver as a separate process for the sync benchmarks, so its CPU and memory
are not counted as the appliance's (`appliance receiver` on 127.0.0.1, an ephemeral port)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

_LISTENING = re.compile(r"receiver listening on (http://\S+)")


def _drain(stream: IO[str]) -> None:
    with contextlib.suppress(ValueError, OSError):  # closed by stop()
        for _ in stream:
            pass


class ReceiverProcess:
    """`with ReceiverProcess(data_dir, {appliance_id: token}) as rx: rx.url` -- a running receiver.

    The data dir is the receiver's own (its SQLite + payload files); `summary_db` reads it after
    the process has stopped or while it runs (WAL readers do not block it)."""

    def __init__(self, data_dir: Path, tokens: dict[str, str], *, start_timeout: float = 30.0):
        self.data_dir = data_dir
        self.tokens = tokens
        self.start_timeout = start_timeout
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tokens_file = self.data_dir.parent / f"{self.data_dir.name}.tokens"
        tokens_file.write_text("".join(f"{aid} {tok}\n" for aid, tok in self.tokens.items()))
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "receiver",
                "--listen",
                "127.0.0.1:0",
                "--data",
                str(self.data_dir),
                "--tokens",
                str(tokens_file),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if not line:
                break
            found = _LISTENING.search(line)
            if found:
                self.url = found.group(1)
                # Keep reading stdout so a chatty receiver can never block on a full pipe.
                threading.Thread(target=_drain, args=(self._proc.stdout,), daemon=True).start()
                return self
        self.stop()
        raise RuntimeError(
            "the receiver did not start (run `appliance receiver` by hand to see why)"
        )

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
