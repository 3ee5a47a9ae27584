"""The `appliance models ...` command line: its actions and their options (what `--help` shows).
Kept apart from appliance/models/cli.py, which runs them, so that building the CLI's parser
imports no model library: `appliance receiver` and the quick commands start in a fraction of a
second."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_models_parser(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add `models` to the CLI's subcommands (`commands`, an argparse subparsers action)."""
    models = commands.add_parser(
        "models", help="detection models, anomaly baselines and signed model packages"
    )
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
    refit = sub.add_parser(
        "refit",
        help="ask the running appliance to refit a source's anomaly baseline now (validated, "
        "canaried and watched like a scheduled refit)",
    )
    refit.add_argument("source", metavar="SOURCE", help="sensor source with `anomaly.refit`")
    _store_options(refit)
    _add_package_parsers(sub)


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="config file (default: demo profile)")
    parser.add_argument(
        "--data-dir", type=Path, help="data directory (overrides the config and APPLIANCE_DATA_DIR)"
    )


def _add_package_parsers(sub: Any) -> None:
    listing = sub.add_parser("list", help="installed model packages and their state")
    _store_options(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")
    imported = sub.add_parser(
        "import", help="verify a model package and install it (staged, not active)"
    )
    imported.add_argument("package", type=Path, metavar="PKG", help="package file (.tar)")
    _store_options(imported)
    verify = sub.add_parser(
        "verify", help="verify a model package against this appliance's keys; install nothing"
    )
    verify.add_argument("package", type=Path, metavar="PKG", help="package file (.tar)")
    _store_options(verify)
    activate = sub.add_parser("activate", help="make an installed version the active one")
    activate.add_argument("name", metavar="NAME", help="package name")
    activate.add_argument("version", metavar="VERSION", help="installed version")
    _store_options(activate)
    rollback = sub.add_parser("rollback", help="make the previous version active again")
    rollback.add_argument("name", metavar="NAME", help="package name")
    _store_options(rollback)
    keygen = sub.add_parser("keygen", help="publisher: create an Ed25519 signing key")
    keygen.add_argument(
        "--out", type=Path, required=True, metavar="KEYFILE", help="private key file to create"
    )
    pack = sub.add_parser("pack", help="publisher: build and sign a model package")
    pack.add_argument("--key", type=Path, required=True, metavar="KEYFILE", help="private key")
    pack.add_argument("--name", required=True, help="package name (package:NAME in configs)")
    pack.add_argument("--version", required=True, help="version, unique per name")
    pack.add_argument("--task", required=True, choices=["detector", "anomaly"], help="model kind")
    pack.add_argument("--model", type=Path, required=True, metavar="FILE", help=".onnx (or .npz)")
    pack.add_argument("--labels", type=Path, metavar="FILE", help="class names, one a line")
    pack.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="ID|group:G",
        help="appliance id or group it is for (repeatable; none: any appliance)",
    )
    pack.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a metric it was accepted with (repeatable)",
    )
    pack.add_argument("--score-threshold", type=float, help="detector: score threshold")
    pack.add_argument("--nms-iou", type=float, help="detector: NMS overlap")
    pack.add_argument("--threshold", type=float, help="anomaly model: score threshold")
    pack.add_argument("--min-agreement", type=float, help="canary: least agreement (0..1)")
    pack.add_argument("--max-latency-ratio", type=float, help="canary: most latency ratio")
    pack.add_argument("--max-error-rate", type=float, help="canary: most error rate (0..1)")
    pack.add_argument(
        "-o", "--output", type=Path, required=True, metavar="PKG", help="package file to write"
    )
