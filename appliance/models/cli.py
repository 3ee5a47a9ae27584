"""`appliance models ...`: prepare the built-in detector, convert darknet models to ONNX, fit
an anomaly baseline on readings already in the journal or ask the running daemon to refit one,
and signed model packages: the publisher's keygen and pack, the appliance's list, import, verify,
activate and rollback."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import aiohttp
import numpy as np
from pydantic import ValidationError

from appliance.models.candidate import recorded_windows
from appliance.models.store import ModelStore, StoreError, UnknownPackage
from appliance.runtime.control import CONTROL_SOCKET, ask_refit
from appliance.stages.baselines import BaselineStore
from config import load_config
from inference.anomaly_fit import fit_baseline
from inference.builtin import BUILTIN_MODELS, prepare_builtin_models
from inference.darknet import convert_darknet, save_model
from inference.package_keys import (
    generate_private_key,
    key_id,
    load_private_key,
    public_key_text,
    write_private_key,
)
from inference.package_manifest import (
    CanaryLimits,
    PackageError,
    Thresholds,
    parse_labels,
    validation_message,
)
from inference.packages import build_package, read_package
from inference.session import ModelError
from sync.errors import JournalMissing
from sync.reader import JournalReader
from sync.records import parse_since

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run_models(args: argparse.Namespace) -> int:
    if args.models_command in _PACKAGE_COMMANDS:
        return _PACKAGE_COMMANDS[args.models_command](args)
    if args.models_command == "fit-baseline":
        return _fit_baseline(args)
    if args.models_command == "refit":
        return _refit(args)
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
        found = recorded_windows(reader, args.source, sensor.anomaly, since=since, until=until)
    finally:
        reader.close()
    if not found.vectors:
        print(f"error: no clean readings of {args.source!r} in that range", file=sys.stderr)
        return EXIT_FAILED
    names, skipped = found.names, found.skipped
    try:
        baseline = fit_baseline(
            sensor.anomaly, np.asarray(found.vectors), names, dropped=skipped, covering=found.span
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
    for name, why in sorted(baseline.excluded.items()):
        print(f"left out: {name} ({why} during the readings fitted on)", file=sys.stderr)
    print("the source scores with it from its next start (restart the appliance)", file=sys.stderr)
    return EXIT_OK


def _refit(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, data_dir=args.data_dir)
    sensor = next((s for s in cfg.sensors if s.name == args.source), None)
    if sensor is None or sensor.anomaly is None or not sensor.anomaly.refit.enabled:
        refitting = [
            s.name for s in cfg.sensors if s.anomaly is not None and s.anomaly.refit.enabled
        ]
        return _fail(
            f"{args.source!r} is not a sensor source with anomaly.refit enabled; those with it: "
            f"{refitting}",
            EXIT_USAGE,
        )
    data_dir = cfg.appliance.data_dir
    try:
        answer = asyncio.run(ask_refit(data_dir, args.source))
    except (OSError, aiohttp.ClientConnectionError):
        return _fail(
            f"no running appliance answers on {data_dir / CONTROL_SOCKET}: a refit runs in the "
            "daemon (its canary scores the source's live windows); start it with `appliance run`",
            EXIT_FAILED,
        )
    if not answer.get("started"):
        return _fail(f"refit not started: {answer.get('reason')}", EXIT_FAILED)
    print(f"refit of {args.source} started")
    print(
        "each step is a `model` record (appliance export --kind model); its state is in the "
        "source's anomaly entry of `appliance status --json`",
        file=sys.stderr,
    )
    return EXIT_OK


# -- model packages -------------------------------------------------------------------------------


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _open_store(args: argparse.Namespace) -> ModelStore:
    return ModelStore.from_config(load_config(args.config, data_dir=args.data_dir))


def _list(args: argparse.Namespace) -> int:
    entries = _open_store(args).entries()
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return EXIT_OK
    if not entries:
        print("no model packages installed", file=sys.stderr)
        return EXIT_OK
    rows = [("NAME", "VERSION", "TASK", "STATE", "IMPORTED", "SHA256")]
    rows += [(e.name, e.version, e.task, e.state, e.imported_at, e.sha256[:16]) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if not args.package.is_file():
        return _fail(f"PKG {args.package} is not a readable file", EXIT_USAGE)
    try:
        package, events = store.import_package(args.package)
    except PackageError as exc:
        return _fail(f"refused: {exc}", EXIT_FAILED)
    except StoreError as exc:
        return _fail(str(exc), EXIT_FAILED)
    if not events:
        print(f"{package.ref}: already installed, unchanged")
        return EXIT_OK
    for event in events:
        if event.action == "prune":
            print(f"pruned {event.name} {event.version}")
    print(f"imported {package.ref} (staged; model sha256 {package.model_sha256})")
    print(
        f"activate it: appliance models activate {package.manifest.name} "
        f"{package.manifest.version}",
        file=sys.stderr,
    )
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if not args.package.is_file():
        return _fail(f"PKG {args.package} is not a readable file", EXIT_USAGE)
    with tempfile.TemporaryDirectory(prefix="appliance-verify-") as scratch:
        try:
            package = read_package(
                args.package,
                store.trusted,
                into=Path(scratch) / "package",
                appliance_id=store.appliance_id,
                group=store.group,
            )
        except PackageError as exc:
            return _fail(f"refused: {exc}", EXIT_FAILED)
        summary = package.summary()
    print(f"{args.package}: ok")
    for key, value in summary.items():
        text = value if isinstance(value, str) else json.dumps(value)
        print(f"  {key}: {text}")
    return EXIT_OK


def _activate(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        event = store.activate(args.name, args.version)
    except UnknownPackage as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (PackageError, StoreError) as exc:
        return _fail(f"not activated: {exc}", EXIT_FAILED)
    if event is None:
        print(f"{args.name} {args.version} is already active")
    else:
        print(f"{args.name}: {args.version} active (previous: {event.previous or 'none'})")
    print("a running appliance loads it at the model's next start", file=sys.stderr)
    return EXIT_OK


def _rollback(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        event = store.rollback(args.name)
    except UnknownPackage as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (PackageError, StoreError) as exc:
        return _fail(f"not rolled back: {exc}", EXIT_FAILED)
    print(f"{args.name}: {event.version} active again (previous: {event.previous})")
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    if args.out.exists():
        return _fail(f"{args.out} exists; refusing to overwrite a private key", EXIT_USAGE)
    private_key = generate_private_key()
    write_private_key(args.out, private_key)
    public = private_key.public_key()
    fingerprint = key_id(public)
    print(f"private key: {args.out} (keep it off the appliances)")
    print(f"key id: {fingerprint}")
    print(f"public key: {public_key_text(public)}")
    print("trust it on an appliance with:", file=sys.stderr)
    print(
        f"  model_packages:\n    trusted_keys:\n      {fingerprint}: {public_key_text(public)}",
        file=sys.stderr,
    )
    return EXIT_OK


def _parse_metrics(items: list[str]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            metrics[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--metric {item!r} is not KEY=NUMBER") from None
    return metrics


def _pack(args: argparse.Namespace) -> int:
    try:
        private_key = load_private_key(args.key)
        metrics = _parse_metrics(args.metric)
        thresholds = Thresholds(
            score_threshold=args.score_threshold, nms_iou=args.nms_iou, threshold=args.threshold
        )
        limits = (args.min_agreement, args.max_latency_ratio, args.max_error_rate)
        canary = None
        if any(limit is not None for limit in limits):
            canary = CanaryLimits(
                min_agreement=args.min_agreement,
                max_latency_ratio=args.max_latency_ratio,
                max_error_rate=args.max_error_rate,
            )
        labels = None
        if args.labels is not None:
            if not args.labels.is_file():
                raise ValueError(f"--labels {args.labels} is not a readable file")
            labels = list(parse_labels(args.labels, args.labels.read_bytes()))
        manifest = build_package(
            args.output,
            private_key,
            name=args.name,
            version=args.version,
            task=args.task,
            model=args.model,
            labels=labels,
            thresholds=thresholds,
            metrics=metrics,
            canary=canary,
            targets=args.target,
        )
    except ValidationError as exc:  # a bad threshold or canary limit: name the option
        fields = [str(e["loc"][0]) for e in exc.errors() if e["loc"]]
        options = ", ".join(f"--{f.replace('_', '-')}" for f in fields)
        return _fail(f"{options}: {validation_message(exc)}", EXIT_USAGE)
    except (ValueError, PackageError) as exc:  # PackageKeyError is a ValueError
        return _fail(str(exc), EXIT_USAGE)
    digest = manifest.files[manifest.model].sha256
    print(
        f"{args.output}: {manifest.name} {manifest.version} ({manifest.task}), model sha256 "
        f"{digest}, signed by key {manifest.key_id}"
    )
    return EXIT_OK


_PACKAGE_COMMANDS = {
    "list": _list,
    "import": _import,
    "verify": _verify,
    "activate": _activate,
    "rollback": _rollback,
    "keygen": _keygen,
    "pack": _pack,
}
