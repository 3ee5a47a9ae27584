"""The YAML loader: ${VAR} substitution, ${file:PATH} secrets, APPLIANCE_* overrides, and errors
that name the key path and the line."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.errors import ConfigError, ConfigErrors
from config.models import ApplianceConfig
from config.receiver import ReceiverConfig

KeyPath = tuple[str | int, ...]

_SUBSTITUTION = re.compile(
    r"\$\{(?:file:(?P<file>[^}]+)|(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?)\}"
)

# Fixed shortcuts users expect from DESIGN.md; anything else uses APPLIANCE__SECTION__KEY.
_SHORTCUTS: dict[str, KeyPath] = {
    "APPLIANCE_ID": ("appliance", "id"),
    "APPLIANCE_DATA_DIR": ("appliance", "data_dir"),
}
PROFILES = ("demo", "ship", "turbine")


def format_key(path: KeyPath) -> str:
    """`("sensors", 0, "window")` -> `sensors[0].window`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def profile_text(name: str) -> str:
    """Text of a shipped profile such as `demo`."""
    if name not in PROFILES:
        raise ConfigError(
            f"no shipped profile {name!r}; there are {', '.join(PROFILES)}", line=None
        )
    return resources.files("config").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    data_dir: str | Path | None = None,
) -> ApplianceConfig:
    """Load and validate a config file (None: the embedded demo profile)."""
    env = os.environ if environ is None else environ
    if path is None:
        text, name, base = profile_text("demo"), "demo.yaml (embedded profile)", Path.cwd()
    else:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read config file: {exc.strerror}", file=str(file), line=None
            ) from exc
        name, base = str(file), file.parent
    return parse_config(text, file=name, environ=env, data_dir=data_dir, base_dir=base)


def parse_config(
    text: str,
    *,
    file: str = "<config>",
    environ: Mapping[str, str] | None = None,
    data_dir: str | Path | None = None,
    base_dir: Path | None = None,
) -> ApplianceConfig:
    """Validate config text. `${file:PATH}` secrets are read relative to base_dir."""
    env = os.environ if environ is None else environ
    data, lines = _parse_yaml(text, file)
    data = _substitute(data, (), lines, file, env, base_dir or Path.cwd())
    _apply_overrides(data, env, data_dir, file)
    try:
        return ApplianceConfig.model_validate(data)
    except ValidationError as exc:
        raise _convert(exc, lines, file) from None


def _parse_yaml(text: str, file: str) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(f"not valid YAML: {exc.problem or exc}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=file, line=None) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict) or node is None:
        raise ConfigError(
            "the file must be a YAML mapping with an `appliance:` section", file=file, line=1
        )
    lines: dict[KeyPath, int] = {}
    _index_lines(node, (), lines)
    return data, lines


def _index_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, (*path, index), lines)


def _line_for(path: KeyPath, lines: Mapping[KeyPath, int]) -> int | None:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _substitute(
    value: Any,
    path: KeyPath,
    lines: Mapping[KeyPath, int],
    file: str,
    env: Mapping[str, str],
    base: Path,
) -> Any:
    if isinstance(value, dict):
        return {
            k: _substitute(v, (*path, str(k)), lines, file, env, base) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_substitute(v, (*path, i), lines, file, env, base) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group("file"):
            secret = Path(match.group("file").strip())
            secret = secret if secret.is_absolute() else base / secret
            try:
                return secret.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"cannot read secret file {str(secret)!r}: {exc.strerror}",
                    file=file,
                    key=format_key(path),
                    line=_line_for(path, lines),
                ) from None
        var = match.group("var")
        if var in env:
            return env[var]
        if match.group("default") is not None:
            return match.group("default")
        raise ConfigError(
            f"environment variable {var} is not set (write ${{{var}:-default}} to give a default)",
            file=file,
            key=format_key(path),
            line=_line_for(path, lines),
        )

    return _SUBSTITUTION.sub(replace, value)


def _apply_overrides(
    data: dict[str, Any], env: Mapping[str, str], data_dir: str | Path | None, file: str
) -> None:
    overrides: list[tuple[KeyPath, Any]] = []
    for var, path in _SHORTCUTS.items():
        if env.get(var):
            overrides.append((path, env[var]))
    for var, raw in env.items():
        if var.startswith("APPLIANCE__"):
            parts = tuple(
                part.lower() for part in var.removeprefix("APPLIANCE__").split("__") if part
            )
            if parts:
                overrides.append((parts, yaml.safe_load(raw) if raw else raw))
    if data_dir is not None:
        overrides.append((("appliance", "data_dir"), str(data_dir)))
    for path, value in overrides:
        target: Any = data
        for part in path[:-1]:
            if not isinstance(target, dict):
                raise ConfigError(
                    f"override {format_key(path)} does not fit the file", file=file, line=None
                )
            target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(
                f"override {format_key(path)} does not fit the file", file=file, line=None
            )
        target[path[-1]] = value


def _convert(exc: ValidationError, lines: Mapping[KeyPath, int], file: str) -> ConfigErrors:
    errors: list[ConfigError] = []
    for error in exc.errors(include_url=False):
        # Discriminated unions add the tag (e.g. "simulated") to the location; it is not a key.
        loc: KeyPath = tuple(
            part
            for part in error["loc"]
            if not (
                isinstance(part, str)
                and part in ("simulated", "csv", "http", "directory", "s3", "sqlite", "postgres")
            )
        )
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and its section)"
        elif error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "union_tag_invalid":
            ctx = error.get("ctx") or {}
            message = f"unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
        errors.append(
            ConfigError(message, file=file, key=format_key(loc), line=_line_for(loc, lines))
        )
    return ConfigErrors(errors)


def load_receiver_config(
    path: str | Path, *, environ: Mapping[str, str] | None = None
) -> ReceiverConfig:
    """Load and validate the receiver's config file: the same YAML, `${VAR}` and `${file:PATH}`
    rules and line-numbered errors as the appliance's (no APPLIANCE_* overrides)."""
    env = os.environ if environ is None else environ
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror}", file=str(file), line=None
        ) from exc
    data, lines = _parse_yaml(text, str(file))
    data = _substitute(data, (), lines, str(file), env, file.parent)
    try:
        return ReceiverConfig.model_validate(data)
    except ValidationError as exc:
        raise _convert(exc, lines, str(file)) from None


def receiver_config_schema() -> dict[str, Any]:
    """JSON schema of the receiver's config file."""
    return ReceiverConfig.model_json_schema()


def config_schema() -> dict[str, Any]:
    """JSON schema of the configuration file."""
    return ApplianceConfig.model_json_schema()
