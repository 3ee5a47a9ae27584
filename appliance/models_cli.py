"""`appliance models ...`: prepare the built-in detector, and convert darknet models to ONNX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from inference.builtin import BUILTIN_MODELS, prepare_builtin_models
from inference.darknet import convert_darknet, save_model
from inference.session import ModelError

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


def run_models(args: argparse.Namespace) -> int:
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
