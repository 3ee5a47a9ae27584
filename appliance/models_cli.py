"""`appliance models ...`: prepare the built-in detector, convert darknet models to ONNX, and fit
an anomaly baseline on readings already in the journal."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from appliance.anomalies import feature_names_of
from appliance.baselines import BaselineStore
from appliance.export import parse_since
from config import AnomalySettings, load_config
from inference.anomaly import fit_baseline
from inference.builtin import BUILTIN_MODELS, prepare_builtin_models
from inference.darknet import convert_darknet, save_model
from inference.features import feature_vector
from inference.session import ModelError
from sync.errors import JournalMissing
from sync.reader import JournalReader

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_models_parser(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add `models` to the CLI's subcommands (`commands`, an argparse subparsers action)."""
    models = commands.add_parser("models", help="prepare and convert detection models")
    sub = models.add_subparsers(
        dest="models_command", required=True, metavar="ACTION", parser_class=parser_class
    )
    sub.add_parser(
        "prepare",
        help="convert the built-in models into the model cache (done by `make`; offline)",
    )
    convert = sub.add_parser(
        "import-darknet", help="convert a darknet cfg + weights + names to an ONNX file"
    )
    convert.add_argument("cfg", type=Path, metavar="CFG", help="darknet .cfg")
    convert.add_argument("weights", type=Path, metavar="WEIGHTS", help="darknet .weights")
    convert.add_argument("names", type=Path, metavar="NAMES", help="class names, one a line")
    convert.add_argument(
        "-o", "--output", type=Path, required=True, metavar="FILE", help="ONNX file to write"
    )
    convert.add_argument("--name", help="model name stamped on records (default: the cfg's stem)")
    convert.add_argument(
        "--version", default="1", help="model version stamped on records (default: 1)"
    )
    fit = sub.add_parser(
        "fit-baseline",
        help="fit a source's anomaly baseline on its readings in the journal (used from the "
        "source's next start)",
    )
    fit.add_argument("source", metavar="SOURCE", help="sensor source name (it needs `anomaly:`)")
    fit.add_argument("-c", "--config", type=Path, help="config file (default: demo profile)")
    fit.add_argument(
        "--data-dir", type=Path, help="data directory (overrides the config and APPLIANCE_DATA_DIR)"
    )
    fit.add_argument(
        "--since", help="readings at or after this time (ISO-8601) or age (e.g. 2h); default all"
    )
    fit.add_argument(
        "--until", help="readings before this time (ISO-8601) or age (e.g. 30m); default all"
    )


def run_models(args: argparse.Namespace) -> int:
    if args.models_command == "fit-baseline":
        return _fit_baseline(args)
    if args.models_command == "prepare":
        try:
            paths = prepare_builtin_models()
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        for name, path in zip(sorted(BUILTIN_MODELS), paths, strict=True):
            print(f"builtin:{name}: {path}")
        return EXIT_OK
    if args.output.suffix != ".onnx":
        print(f"error: --output {args.output} should end in .onnx", file=sys.stderr)
        return EXIT_USAGE
    for what, path in (("CFG", args.cfg), ("WEIGHTS", args.weights), ("NAMES", args.names)):
        if not path.is_file():
            print(f"error: {what} {path} is not a readable file", file=sys.stderr)
            return EXIT_USAGE
    name = args.name or args.cfg.stem
    try:
        model = convert_darknet(args.cfg, args.weights, args.names, name=name, version=args.version)
        digest = save_model(model, args.output)
    except ModelError as exc:  # DarknetError included: it names the file and line
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.output}: {name}@{args.version}, sha256 {digest}")
    print(f"use it with:  models: {{{name}: {{path: {args.output.resolve()}}}}}", file=sys.stderr)
    return EXIT_OK


def _fit_baseline(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, data_dir=args.data_dir)
    sensor = next((s for s in cfg.sensors if s.name == args.source), None)
    if sensor is None:
        names = [s.name for s in cfg.sensors]
        print(
            f"error: no sensor source {args.source!r} in the config; sources: {names}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if sensor.anomaly is None:
        print(f"error: source {args.source!r} has no `anomaly:` settings", file=sys.stderr)
        return EXIT_USAGE
    try:
        since = parse_since(args.since) if args.since else None
        until = parse_since(args.until, option="--until") if args.until else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        reader = JournalReader.open(cfg.appliance.data_dir)
    except JournalMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        vectors, names, skipped, span = _recorded_vectors(
            reader, args.source, sensor.anomaly, since, until
        )
    finally:
        reader.close()
    if not vectors:
        print(f"error: no clean readings of {args.source!r} in that range", file=sys.stderr)
        return EXIT_FAILED
    try:
        baseline = fit_baseline(
            sensor.anomaly, np.asarray(vectors), names, dropped=skipped, covering=span
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    path = BaselineStore.in_data_dir(cfg.appliance.data_dir).save(args.source, baseline)
    print(
        f"{path}: {args.source}-baseline@{baseline.version}, {baseline.method} on "
        f"{baseline.windows} windows x {len(names)} features ({skipped} readings skipped), "
        f"threshold {baseline.threshold:.6g}"
    )
    print("the source scores with it from its next start (restart the appliance)", file=sys.stderr)
    return EXIT_OK


def _recorded_vectors(
    reader: JournalReader,
    source: str,
    settings: AnomalySettings,
    since: str | None,
    until: str | None,
) -> tuple[list[Any], list[str], int, tuple[datetime, datetime] | None]:
    """Feature vectors of `source`'s readings in [since, until): the readings that met bad input
    (a `quality` list) are skipped and counted, as the daemon's own fit does."""
    vectors: list[Any] = []
    names: list[str] | None = None
    skipped = 0
    first: str | None = None
    last: str | None = None
    for record in reader.iter_records(kind="reading", since=since):
        if record.source != source:
            continue
        if until is not None and record.ts >= until:
            break
        body = record.body
        summary = body.get("channels") if isinstance(body, dict) else None
        if not isinstance(summary, dict) or body.get("quality"):
            skipped += 1
            continue
        if names is None:
            names = feature_names_of(summary, settings.features)
        vectors.append(feature_vector(summary, names))
        first = first or record.ts
        last = record.ts
    span = None
    if first is not None and last is not None:
        span = (_parse_ts(first), _parse_ts(last))
    return vectors, names or [], skipped, span


def _parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))
