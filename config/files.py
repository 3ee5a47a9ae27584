"""The files a config names, checked on this machine by `config check` (not by `run`, which
keeps journalling when a destination's token is missing): secrets and tokens, certificates and
keys, labels files and ONNX models exist, are regular files this user can read and are not
empty, and a token is one word. What a file holds is never put in a message."""

from __future__ import annotations

import stat
from pathlib import Path

from config.base import KeyPath, Problem
from config.models import STATUS_TOKEN_MIN_CHARS, ApplianceConfig
from config.sensors import MqttSensor, OpcUaSensor
from config.shipping import HttpDestination, S3Destination

MAX_READ = 64 * 1024
"""Bytes read of one file: tokens and labels are small, and a path that names a device or a
huge log by mistake must not stall the check."""


def _shown(path: Path) -> str:
    if path.is_absolute():
        return str(path)
    return f"{path} (relative to the working directory, {Path.cwd()})"


def _read(path: Path, what: str) -> tuple[bytes | None, str | None]:
    """The file's first bytes, or why it cannot be used."""
    shown = _shown(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None, f"{what} {shown} does not exist"
    except OSError as exc:
        return None, f"cannot reach {what} {shown}: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return None, f"{what} {shown} is not a regular file"
    try:
        with path.open("rb") as file:
            data = file.read(MAX_READ + 1)
    except OSError as exc:
        return None, f"cannot read {what} {shown}: {exc.strerror or exc}"
    if not data.strip():
        return None, f"{what} {shown} is empty"
    return data, None


def _text(data: bytes, path: Path, what: str) -> tuple[str | None, str | None]:
    if len(data) > MAX_READ:
        return None, f"{what} {_shown(path)} is over {MAX_READ // 1024} KiB; expected a few lines"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, f"{what} {_shown(path)} is not UTF-8 text"


def _token(key: KeyPath, path: Path | None, what: str, min_chars: int = 1) -> list[Problem]:
    if path is None:
        return []
    data, problem = _read(path, what)
    if data is None:
        return [(key, str(problem))]
    text, problem = _text(data, path, what)
    if text is None:
        return [(key, str(problem))]
    words = text.split()
    if len(words) != 1:
        return [(key, f"{what} {_shown(path)} must hold one token; it holds {len(words)} words")]
    if len(words[0]) < min_chars:
        return [
            (key, f"{what} {_shown(path)} must hold a token of at least {min_chars} characters")
        ]
    return []


def _present(key: KeyPath, path: Path | None, what: str) -> list[Problem]:
    if path is None:
        return []
    _, problem = _read(path, what)
    return [(key, problem)] if problem else []


def _labels(key: KeyPath, path: Path) -> tuple[tuple[str, ...] | None, list[Problem]]:
    """The classes of a labels file (one a line), as inference/detect.py reads them."""
    data, problem = _read(path, "labels file")
    if data is None:
        return None, [(key, str(problem))]
    text, problem = _text(data, path, "labels file")
    if text is None:
        return None, [(key, str(problem))]
    lines = [line.strip() for line in text.rstrip().splitlines()]
    for number, line in enumerate(lines, start=1):
        if not line:
            return None, [
                (
                    key,
                    f"line {number} of labels file {_shown(path)} is blank (it would shift "
                    "every later class id)",
                )
            ]
    return tuple(lines), []


def file_problems(cfg: ApplianceConfig) -> list[Problem]:
    """Every file the config names that cannot be used here (paths from the top level)."""
    problems = _token(
        ("status", "token_file"),
        cfg.status.token_file if cfg.status.enabled else None,
        "status page token file",
        STATUS_TOKEN_MIN_CHARS,
    )
    for index, destination in enumerate(cfg.sync.destinations):
        at: KeyPath = ("sync", "destinations", index)
        if isinstance(destination, HttpDestination):
            problems += _token((*at, "token_file"), destination.token_file, "token file")
            problems += _present((*at, "ca_file"), destination.ca_file, "CA file")
            problems += _present((*at, "client_cert"), destination.client_cert, "certificate")
            problems += _present((*at, "client_key"), destination.client_key, "key file")
        elif isinstance(destination, S3Destination):
            problems += _token(
                (*at, "access_key_file"), destination.access_key_file, "access key file"
            )
            problems += _token(
                (*at, "secret_key_file"), destination.secret_key_file, "secret key file"
            )
    for index, sensor in enumerate(cfg.sensors):
        at = ("sensors", index)
        if isinstance(sensor, MqttSensor):
            problems += _present((*at, "ca_file"), sensor.ca_file, "CA file")
        elif isinstance(sensor, OpcUaSensor):
            problems += _present((*at, "certificate"), sensor.certificate, "certificate")
            problems += _present((*at, "private_key"), sensor.private_key, "key file")
            problems += _present(
                (*at, "server_certificate"), sensor.server_certificate, "server certificate"
            )
    labels: dict[str, tuple[str, ...]] = {}
    for name, model in cfg.models.items():
        if model.labels_file is not None:
            found, wrong = _labels(("models", name, "labels_file"), model.labels_file)
            problems += wrong
            if found is not None:
                labels[name] = found
        if not model.path.startswith(("builtin:", "package:")):
            problems += _present(("models", name, "path"), Path(model.path), "model file")
    for index, camera in enumerate(cfg.cameras):
        if camera.model in labels:
            problems += [
                (("cameras", index, *path), message)
                for path, message in camera.class_problems(labels[camera.model])
            ]
    return problems


__all__ = ["MAX_READ", "file_problems"]
