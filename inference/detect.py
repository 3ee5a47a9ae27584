"""ONNX object detectors: `OnnxDetector`, the Detector the pipeline runs, `open_detector`, and
the class labels they use (labels files, the COCO names). Preprocessing lives in
inference/preprocess.py, output decoding and NMS in inference/decode.py."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import numpy as np
import numpy.typing as npt

from config.cameras import BUILTIN_LABELS, DetectorModel
from inference.decode import Adapter, Layout, build_adapter, detect_layout, metadata_labels, nms
from inference.detections import Detection
from inference.preprocess import InputSpec, check_image, unletterbox
from inference.session import LatencyRecorder, LatencyStats, ModelError, ModelSession

if TYPE_CHECKING:
    from inference.packages import PackageResolver

# Darknet's coco.names spelling (the built-in model's labels), so that a camera's class filter
# means the same with the built-in detector and with an 80-class model that ships no labels. The
# list lives with the config, which checks camera classes against it.
COCO_LABELS: tuple[str, ...] = BUILTIN_LABELS

MAX_DETECTIONS = 300
# Candidates entering NMS, best first: bounds its cost when a broken or mis-thresholded model
# scores everything high (greedy NMS is quadratic in the worst case).
MAX_NMS_CANDIDATES = 3000


# -- labels and version ----------------------------------------------------------------------------


def read_labels_file(path: Path) -> tuple[str, ...]:
    """Class names, one a line (trailing blank lines ignored; a blank line inside is an error,
    since it would shift every later class id)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(path, f"cannot read the labels file: {exc.strerror or exc}") from exc
    lines = [line.strip() for line in text.rstrip().splitlines()]
    if not lines:
        raise ModelError(path, "the labels file is empty")
    for number, line in enumerate(lines, start=1):
        if not line:
            raise ModelError(path, f"line {number} of the labels file is blank")
    return tuple(lines)


def sha256_prefix(path: Path, digits: int = 12) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:digits]


# -- the detector ----------------------------------------------------------------------------------


class OnnxDetector:
    """A Detector (inference.detections) backed by an ONNX model on its own executor.

    Loading blocks (reads, hashes and warms the model): from the event loop, construct it with
    `asyncio.to_thread`. `class_offset` applies to the ssd layout only (subtracted from the
    model's class numbers); None: metadata `appliance.class_offset`, else 1 (TF label maps).
    `labels` (from a model package) apply when the config names no labels_file.
    """

    def __init__(
        self,
        cfg: DetectorModel,
        model_path: Path,
        name: str,
        classes: Sequence[str] | None = None,
        *,
        class_offset: int | None = None,
        warm_up: bool = True,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self._given_labels = None if labels is None else tuple(labels)
        self.session = ModelSession(
            model_path, name=name, providers=cfg.providers, threads=cfg.threads, warm_up=False
        )
        try:
            self._setup(classes, class_offset)
            if warm_up:
                self.session.warm_up()
        except BaseException:
            self.session.close()
            raise

    def _setup(self, classes: Sequence[str] | None, class_offset: int | None) -> None:
        session, cfg = self.session, self.cfg
        path = session.path
        if cfg.labels_file:
            given: tuple[str, ...] | None = read_labels_file(cfg.labels_file)
        else:
            given = self._given_labels or metadata_labels(session)
        hint = None if given is None else len(given)
        self.layout: Layout = detect_layout(session, hint) if cfg.layout == "auto" else cfg.layout
        if class_offset is None:
            meta_offset = session.metadata_json("appliance.class_offset")
            if meta_offset is not None and (not isinstance(meta_offset, int) or meta_offset < 0):
                raise ModelError(path, "metadata 'appliance.class_offset' must be an integer >= 0")
            class_offset = 1 if meta_offset is None else meta_offset
        self.adapter: Adapter = build_adapter(self.layout, session, hint, class_offset)
        num_classes = self.adapter.num_classes
        if given is not None and num_classes is not None and len(given) != num_classes:
            source = cfg.labels_file or (
                "the package's labels" if self._given_labels else "the model's metadata"
            )
            raise ModelError(
                path, f"{source} names {len(given)} classes but the model outputs {num_classes}"
            )
        if given is not None:
            self.labels: tuple[str, ...] = given
        elif num_classes == len(COCO_LABELS):
            self.labels = COCO_LABELS
        else:
            self.labels = tuple(f"class_{i}" for i in range(num_classes or 0))

        version = cfg.version or session.metadata.get("appliance.version") or sha256_prefix(path)
        self.version: str = version
        self.input_spec = InputSpec.from_session(session)
        self.class_filter = self._class_ids(classes)
        self._stats = LatencyRecorder()

    def _class_ids(self, classes: Sequence[str] | None) -> frozenset[int] | None:
        if not classes:
            return None
        unknown = [c for c in classes if c not in self.labels]
        if unknown:
            known = ", ".join(self.labels) if self.labels else "none (give labels_file)"
            raise ModelError(
                self.session.path,
                f"class filter names {unknown}, not labels of model {self.name!r}; its labels: "
                f"{known}",
            )
        wanted = set(classes)
        return frozenset(i for i, label in enumerate(self.labels) if label in wanted)

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else f"class_{class_id}"

    async def detect(self, image: npt.NDArray[np.uint8]) -> list[Detection]:
        """Detections in one BGR frame, best first; all the work runs on the model's executor."""
        check_image(image)
        return await self.session.call(self.detect_blocking, image)

    def detect_blocking(self, image: npt.NDArray[np.uint8]) -> list[Detection]:
        """`detect` in the calling thread (benchmarks, replay tools that own their threads)."""
        check_image(image)
        start = time.perf_counter()
        try:
            found = self._detect(image)
        except Exception:
            self._stats.error()
            raise
        self._stats.record(time.perf_counter() - start)
        return found

    def _detect(self, image: npt.NDArray[np.uint8]) -> list[Detection]:
        spec = self.input_spec
        tensor, geometry = spec.prepare(image)
        outputs = self.session.run_blocking({self.session.input.name: tensor})
        boxes, scores, ids = self.adapter.decode(
            outputs, spec.width, spec.height, self.cfg.score_threshold
        )
        if self.class_filter is not None and len(ids):
            wanted = np.isin(ids, np.fromiter(self.class_filter, dtype=np.int64))
            boxes, scores, ids = boxes[wanted], scores[wanted], ids[wanted]
        if len(scores) > MAX_NMS_CANDIDATES:
            best = np.argsort(-scores, kind="stable")[:MAX_NMS_CANDIDATES]
            boxes, scores, ids = boxes[best], scores[best], ids[best]
        finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
        boxes, scores, ids = boxes[finite], scores[finite], ids[finite]
        keep = nms(boxes, scores, self.cfg.nms_iou, ids)
        height, width = image.shape[:2]
        mapped = unletterbox(
            boxes[keep],
            (geometry.scale_x, geometry.scale_y),
            geometry.pad_x,
            geometry.pad_y,
            width,
            height,
        )
        found: list[Detection] = []
        for (x1, y1, x2, y2), score, class_id in zip(
            mapped.tolist(), scores[keep].tolist(), ids[keep].tolist(), strict=True
        ):
            if x2 <= x1 or y2 <= y1:  # entirely in the padding, or clipped away
                continue
            found.append(Detection(x1, y1, x2, y2, score, class_id, self.label(class_id)))
            if len(found) == MAX_DETECTIONS:
                break
        return found

    @property
    def stats(self) -> LatencyStats:
        """Latency of whole detect() calls (preprocessing, inference, decoding, NMS)."""
        return self._stats.snapshot()

    def describe(self) -> dict[str, object]:
        """What the status page shows about this detector."""
        return {
            **self.session.describe(),
            "version": self.version,
            "layout": self.layout,
            "classes": len(self.labels),
            "detect_latency": self.stats.as_dict(),
        }

    def close(self) -> None:
        self.session.close()

    async def aclose(self) -> None:
        await self.session.aclose()

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


def open_detector(
    cfg: DetectorModel,
    name: str,
    classes: Sequence[str] | None = None,
    *,
    packages: PackageResolver | None = None,
) -> OnnxDetector:
    """The detector `cfg` describes; `builtin:` paths resolve to the shipped model (which may be
    converted on first use, so call this via `asyncio.to_thread` from the loop), `package:NAME`
    to the verified active version of an installed package in `packages` (whose manifest gives
    the labels, thresholds and version the config leaves unset)."""
    if cfg.path.startswith("package:"):
        # Imported here: package verification (cryptography) is only needed when a config asks.
        from inference.packages import PREFIX, detector_settings

        if packages is None:
            raise ModelError(
                cfg.path,
                "a package model needs the appliance's model store (DATA_DIR/models/packages), "
                "which this caller did not give",
            )
        package = packages.resolve(cfg.path.removeprefix(PREFIX))
        settings, labels = detector_settings(cfg, package)
        return OnnxDetector(settings, package.model_path, name, classes, labels=labels)
    if cfg.path.startswith("builtin:"):
        # Imported here: the built-in model's machinery (conversion from darknet) is only needed
        # when a config asks for it.
        from inference.builtin import builtin_model_path

        path = builtin_model_path(cfg.path)
    else:
        path = Path(cfg.path).expanduser()
    return OnnxDetector(cfg, path, name, classes)
