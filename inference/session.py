"""ONNX model sessions: loading a model with onnxruntime, a private one-thread executor per model so
the event loop never blocks on inference, warm-up, and latency statistics for the status page."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, TypeVarTuple

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# Input size used for dynamic spatial dimensions when neither the model nor its metadata fixes
# one: the size YOLOv5/v8/v11 exports are trained at.
DEFAULT_INPUT_SIZE = 640
# Enough recent runs for a stable p95, few enough that the stats follow a change (thermal
# throttling, a busier CPU) within a minute or two at a few frames a second.
LATENCY_WINDOW = 256

Dim = int | str | None
ImageLayout = Literal["nchw", "nhwc"]

_INPUT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
}


class ModelError(Exception):
    """A model that cannot be used as configured. Permanent: fix the file or the config.

    `path` is the model file; `reason` the message without it.
    """

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class InferenceError(ModelError):
    """One run of a loaded model failed (onnxruntime raised). The next input may well work, so
    callers count it and go on rather than giving up on the model."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Name, shape and element type of one model input or output as the model declares them.

    Dimensions are ints when fixed, the symbolic name (str) or None when dynamic.
    """

    name: str
    shape: tuple[Dim, ...]
    type: str

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} [{dims}] {self.type}"


def fixed(dim: Dim) -> int | None:
    """The dimension's size when the model fixes it, else None."""
    return dim if isinstance(dim, int) and dim > 0 else None


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Latency of recent runs: `count` and `errors` since load, percentiles over the last
    `window` successful runs (None before the first)."""

    count: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    window: int

    def as_dict(self) -> dict[str, object]:
        return {
            "count": self.count,
            "errors": self.errors,
            "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 2),
            "p95_ms": None if self.p95_ms is None else round(self.p95_ms, 2),
            "window": self.window,
        }


class LatencyRecorder:
    """Thread-safe: written from a model's executor thread, read from the event loop."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"latency window must be at least 1, got {window}")
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=window)
        self._count = 0
        self._errors = 0

    def record(self, seconds: float) -> None:
        with self._lock:
            self._recent.append(seconds)
            self._count += 1

    def error(self) -> None:
        with self._lock:
            self._errors += 1

    def snapshot(self) -> LatencyStats:
        with self._lock:
            recent = np.fromiter(self._recent, dtype=np.float64, count=len(self._recent))
            count, errors, window = self._count, self._errors, self._recent.maxlen or 0
        if recent.size == 0:
            return LatencyStats(count, errors, None, None, window)
        p50, p95 = np.percentile(recent, [50, 95]) * 1000.0
        return LatencyStats(count, errors, float(p50), float(p95), window)


def choose_providers(path: Path, requested: Sequence[str]) -> list[str]:
    """The requested providers this onnxruntime can use, in the requested order.

    A name onnxruntime does not know at all is a typo and an error. A known provider missing from
    this build (e.g. CUDA on a CPU-only box) is skipped with a warning so one config can list
    ["CUDAExecutionProvider", "CPUExecutionProvider"] for every site; but when none is left it is
    an error, since silently running elsewhere than asked would hide a broken install.
    """
    available = list(ort.get_available_providers())
    known = set(ort.get_all_providers())
    if not requested:
        raise ModelError(path, f"no execution provider given; this onnxruntime offers {available}")
    unknown = [p for p in requested if p not in known]
    if unknown:
        raise ModelError(
            path,
            f"unknown onnxruntime execution provider(s) {unknown}; this onnxruntime offers "
            f"{available}",
        )
    chosen = [p for p in requested if p in available]
    if not chosen:
        raise ModelError(
            path,
            f"none of the requested execution providers {list(requested)} is available; this "
            f"onnxruntime offers {available}",
        )
    skipped = [p for p in requested if p not in available]
    if skipped:
        log.warning(
            "%s: execution provider(s) %s not available in this onnxruntime, using %s",
            path,
            skipped,
            chosen,
        )
    return chosen


def _tensor_info(node: Any) -> TensorInfo:
    shape = tuple(d if isinstance(d, int | str) else None for d in (node.shape or ()))
    return TensorInfo(name=str(node.name), shape=shape, type=str(node.type))


class ModelSession:
    """One loaded ONNX image model and the single thread that runs it.

    Loading (the constructor) blocks: call it via `asyncio.to_thread` from the event loop. Every
    run goes through the model's own executor (one thread named `model-<name>`): runs of one
    model queue behind each other instead of competing for the cores, and a slow model delays
    only its own callers. onnxruntime's intra-op pool still spreads one run over `threads` cores.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        name: str,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 1,
        warm_up: bool = True,
        latency_window: int = LATENCY_WINDOW,
    ) -> None:
        self.path = Path(path)
        self.name = name
        if threads < 1:
            raise ModelError(self.path, f"threads must be at least 1, got {threads}")
        if not self.path.exists():
            raise ModelError(self.path, "no such model file")
        if not self.path.is_file():
            raise ModelError(self.path, "not a file (an ONNX model file is expected)")
        chosen = choose_providers(self.path, providers)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # One run at a time per model (own executor), so inter-op parallelism would only add
        # threads that fight the intra-op pool for the same few cores.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning workers burn whole cores between frames; on a 2-4 core edge box that CPU
        # belongs to decoding, the journal and the other models.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session: Any = ort.InferenceSession(
                str(self.path), sess_options=options, providers=chosen
            )
        except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, ... (no common base)
            raise ModelError(
                self.path, f"onnxruntime cannot load it ({type(exc).__name__}): {exc}"
            ) from exc

        self.providers: list[str] = list(self._session.get_providers())
        if self.providers[0] != chosen[0]:
            log.warning(
                "%s: asked for %s, onnxruntime runs it on %s", self.path, chosen, self.providers
            )
        self.inputs = [_tensor_info(node) for node in self._session.get_inputs()]
        self.outputs = [_tensor_info(node) for node in self._session.get_outputs()]
        self.metadata: dict[str, str] = dict(
            self._session.get_modelmeta().custom_metadata_map or {}
        )
        self.input, self.image_layout, self.input_dtype = self._check_image_input()
        self.input_size = self._resolve_input_size()

        self._stats = LatencyRecorder(latency_window)
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self.warm_up_s: float | None = None
        if warm_up:
            try:
                self.warm_up()
            except BaseException:
                self.close()
                raise

    # -- what the model looks like -------------------------------------------------------------

    def _check_image_input(self) -> tuple[TensorInfo, ImageLayout, np.dtype[Any]]:
        expected = "one image tensor [1, 3, H, W] or [1, H, W, 3] (float32, float16 or uint8)"
        found = "; ".join(i.describe() for i in self.inputs) or "none"
        if len(self.inputs) != 1:
            raise ModelError(
                self.path,
                f"the model has {len(self.inputs)} inputs ({found}); a detector takes {expected}",
            )
        info = self.inputs[0]
        if len(info.shape) != 4:
            raise ModelError(
                self.path,
                f"its input {info.describe()} has rank {len(info.shape)}, not 4; {expected}",
            )
        dtype = _INPUT_DTYPES.get(info.type)
        if dtype is None:
            raise ModelError(self.path, f"its input {info.describe()} is not an image; {expected}")
        batch, c1, _, c3 = (fixed(d) for d in info.shape)
        if batch not in (None, 1):
            raise ModelError(
                self.path,
                f"its input {info.describe()} has batch size {batch}; only 1 is supported",
            )
        layout: ImageLayout
        if c1 == 3:
            layout = "nchw"
        elif c3 == 3:
            layout = "nhwc"
        elif c1 is None:
            # Channels-first is what PyTorch exports (YOLOv5/v8/v11, our converter) produce.
            layout = "nchw"
        elif c3 is None:
            layout = "nhwc"
        else:
            raise ModelError(
                self.path,
                f"its input {info.describe()} does not have 3 colour channels; {expected}",
            )
        return info, layout, np.dtype(dtype)

    def metadata_json(self, key: str) -> Any:
        """A metadata value that holds JSON, decoded (None when the key is absent)."""
        raw = self.metadata.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelError(
                self.path, f"metadata {key!r} is not valid JSON ({exc}): {raw!r}"
            ) from exc

    def _metadata_size(self) -> tuple[int | None, int | None]:
        """(width, height) from `appliance.input`, else from Ultralytics' `imgsz` ([h, w])."""
        spec = self.metadata_json("appliance.input")
        if spec is not None:
            if not isinstance(spec, dict):
                raise ModelError(
                    self.path, f"metadata 'appliance.input' must be an object: {spec!r}"
                )
            sizes = [spec.get("width"), spec.get("height")]
            for key, value in zip(("width", "height"), sizes, strict=True):
                if value is not None and not (isinstance(value, int) and value > 0):
                    raise ModelError(
                        self.path, f"metadata 'appliance.input' {key} must be a positive integer"
                    )
            return sizes[0], sizes[1]
        imgsz = self.metadata.get("imgsz")
        if imgsz is not None:
            try:
                value = ast.literal_eval(imgsz)
            except (ValueError, SyntaxError):
                value = None
            if isinstance(value, int) and value > 0:
                return value, value
            if (
                isinstance(value, list | tuple)
                and len(value) == 2
                and all(isinstance(v, int) and v > 0 for v in value)
            ):
                return int(value[1]), int(value[0])
            log.warning("%s: ignoring unreadable metadata imgsz=%r", self.path, imgsz)
        return None, None

    def _resolve_input_size(self) -> tuple[int, int]:
        shape = self.input.shape
        h_dim, w_dim = (shape[2], shape[3]) if self.image_layout == "nchw" else (shape[1], shape[2])
        meta_w, meta_h = self._metadata_size()
        width = fixed(w_dim) or meta_w or DEFAULT_INPUT_SIZE
        height = fixed(h_dim) or meta_h or DEFAULT_INPUT_SIZE
        return width, height

    def input_shape(self) -> tuple[int, int, int, int]:
        """The concrete shape fed to the model: batch 1, 3 channels, `input_size`."""
        width, height = self.input_size
        if self.image_layout == "nchw":
            return (1, 3, height, width)
        return (1, height, width, 3)

    # -- running ---------------------------------------------------------------------------

    def warm_up(self) -> float:
        """One run on zeros (first runs allocate and pick kernels); its seconds. Not in stats."""
        zeros = np.zeros(self.input_shape(), dtype=self.input_dtype)
        start = time.perf_counter()
        future = self._submit(self._session_run, {self.input.name: zeros})
        try:
            future.result()
        except Exception as exc:
            raise ModelError(
                self.path, f"warm-up run failed ({type(exc).__name__}): {exc}"
            ) from exc
        self.warm_up_s = time.perf_counter() - start
        log.info("%s: model %s warmed up in %.3f s", self.path, self.name, self.warm_up_s)
        return self.warm_up_s

    def _session_run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return [np.asarray(out) for out in self._session.run(None, dict(feeds))]

    def run_blocking(self, feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """One timed run, in the calling thread. Meant for work already on this model's executor
        (see `call`); from the event loop use `run`."""
        if self._closed:
            raise ModelError(self.path, f"model {self.name} is closed")
        start = time.perf_counter()
        try:
            outputs = self._session_run(feeds)
        except Exception as exc:
            self._stats.error()
            raise InferenceError(
                self.path, f"inference failed ({type(exc).__name__}): {exc}"
            ) from exc
        self._stats.record(time.perf_counter() - start)
        return outputs

    async def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """The model's outputs for `feeds`, computed on the model's executor."""
        return await self.call(self.run_blocking, feeds)

    async def call(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """`fn(*args)` on this model's executor: for pre- and post-processing that belongs with a
        run, so the loop stays free for all of it."""
        loop = asyncio.get_running_loop()
        return await asyncio.wrap_future(self._submit(fn, *args), loop=loop)

    def _submit(self, fn: Callable[[*Ts], T], *args: *Ts) -> Any:
        if self._closed:
            raise ModelError(self.path, f"model {self.name} is closed")
        try:
            return self._executor.submit(fn, *args)
        except RuntimeError as exc:  # shut down between the check and the submit
            raise ModelError(self.path, f"model {self.name} is closed") from exc

    @property
    def stats(self) -> LatencyStats:
        """Inference latency only (without pre- and post-processing)."""
        return self._stats.snapshot()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the executor after the runs already queued (bounded: one model, one thread).
        Idempotent. Blocks for at most those runs; from the loop prefer `aclose`."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self._session = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def describe(self) -> dict[str, object]:
        """What the status page shows about the model."""
        return {
            "name": self.name,
            "path": str(self.path),
            "providers": self.providers,
            "input": self.input.describe(),
            "input_size": list(self.input_size),
            "outputs": [o.describe() for o in self.outputs],
            "warm_up_s": None if self.warm_up_s is None else round(self.warm_up_s, 3),
            "latency": self.stats.as_dict(),
        }
