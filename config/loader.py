"""The YAML loader: YAML syntax errors with a hint, keys given twice, ${VAR} substitution,
${file:PATH} secrets (never shown in a message), APPLIANCE_* overrides, and every error at the
line and column of the key or value it is about; `check_config` adds the checks of the files a
config names and the warnings `config check` prints."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from config.base import KeyPath, format_key
from config.errors import ConfigError, ConfigErrors
from config.messages import key_path, message_for, model_at
from config.models import ApplianceConfig
from config.receiver import ReceiverConfig

Position = tuple[int, int]
"""1-based line and column."""
M = TypeVar("M", bound=BaseModel)

_SUBSTITUTION = re.compile(
    r"\$\{(?:file:(?P<file>[^}]+)|(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?)\}"
)

# Fixed shortcuts users expect from DESIGN.md; anything else uses APPLIANCE__SECTION__KEY.
_SHORTCUTS: dict[str, KeyPath] = {
    "APPLIANCE_ID": ("appliance", "id"),
    "APPLIANCE_DATA_DIR": ("appliance", "data_dir"),
}
PROFILES = ("demo", "ship", "turbine")

# What a `${file:PATH}` stands for when `config check --skip-file-checks` leaves it unread: a
# value of the shape its key wants, so the rest of the config is still checked.
_UNREAD_SECRET = "unread-secret"
_UNREAD_KEY = "A" * 43 + "="  # base64 of 32 bytes: the shape of a trusted key
_SECRET_SHAPES: dict[KeyPath, str] = {("model_packages", "trusted_keys"): _UNREAD_KEY}


def profile_text(name: str) -> str:
    """Text of a shipped profile such as `demo`."""
    if name not in PROFILES:
        raise ConfigError(
            f"no shipped profile {name!r}; there are {', '.join(PROFILES)}", line=None
        )
    return resources.files("config").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ entry points


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
        text, name, base = _read_config(path)
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
    return _load(ApplianceConfig, text, file, env, base_dir or Path.cwd(), data_dir).model


@dataclass(frozen=True)
class Checked:
    """What `config check` found in a config that can be used."""

    config: ApplianceConfig
    warnings: tuple[str, ...]
    """Configs that work but likely do less than meant, one line each."""
    unread: tuple[str, ...] = ()
    """`${file:PATH}` secrets left unread (file checks skipped)."""


def check_config(path: str | Path, *, check_files: bool = True) -> Checked:
    """Validate a config file as written (no APPLIANCE_* overrides, no shell variables) and,
    unless `check_files` is False (a config for another machine), the files it names: secrets,
    tokens, certificates, labels, model files. Raises ConfigErrors listing every problem."""
    # Imported here: only `config check` reads the files a config names.
    from config.files import file_problems

    text, name, base = _read_config(path)
    loaded = _load(ApplianceConfig, text, name, {}, base, None, read_secrets=check_files)
    if check_files:
        problems = file_problems(loaded.model)
        if problems:
            raise ConfigErrors(
                [loaded.error(path, message, value=True) for path, message in problems]
            )
    return Checked(loaded.model, tuple(loaded.model.warnings()), tuple(loaded.unread))


def load_receiver_config(
    path: str | Path, *, environ: Mapping[str, str] | None = None
) -> ReceiverConfig:
    """Load and validate the receiver's config file: the same YAML, `${VAR}` and `${file:PATH}`
    rules and located errors as the appliance's (no APPLIANCE_* overrides)."""
    env = os.environ if environ is None else environ
    text, name, base = _read_config(path)
    return _load(ReceiverConfig, text, name, env, base, None, overrides=False).model


def receiver_config_schema() -> dict[str, Any]:
    """JSON schema of the receiver's config file."""
    return ReceiverConfig.model_json_schema()


def config_schema() -> dict[str, Any]:
    """JSON schema of the configuration file."""
    return ApplianceConfig.model_json_schema()


def _read_config(path: str | Path) -> tuple[str, str, Path]:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file: {exc.strerror}", file=str(file), line=None
        ) from exc
    except UnicodeDecodeError:
        raise ConfigError("the config file is not UTF-8 text", file=str(file), line=None) from None
    return text, str(file), file.parent


# ------------------------------------------------------------------------------ the pipeline


@dataclass
class _Index:
    """Where each key path stands in the file."""

    keys: dict[KeyPath, Position] = field(default_factory=dict)
    """Each key (or list item, or the document) where it starts."""
    values: dict[KeyPath, Position] = field(default_factory=dict)
    """Each scalar value where it starts (a value on the key's line has a column of its own)."""

    def where(self, path: KeyPath, *, value: bool = True) -> Position | None:
        if value and path in self.values:
            return self.values[path]
        for end in range(len(path), -1, -1):
            if path[:end] in self.keys:
                return self.keys[path[:end]]
        return None


@dataclass
class _Loaded(Generic[M]):
    model: M
    file: str
    index: _Index
    unread: list[str]

    def error(self, path: KeyPath, message: str, *, value: bool) -> ConfigError:
        return _located(message, self.file, path, self.index, value=value)


def _located(message: str, file: str, path: KeyPath, index: _Index, *, value: bool) -> ConfigError:
    line, column = index.where(path, value=value) or (None, None)
    return ConfigError(message, file=file, key=format_key(path), line=line, column=column)


def _load(
    root: type[M],
    text: str,
    file: str,
    env: Mapping[str, str],
    base: Path,
    data_dir: str | Path | None,
    *,
    overrides: bool = True,
    read_secrets: bool = True,
) -> _Loaded[M]:
    data, index = _parse_yaml(text, file)
    secrets: dict[KeyPath, str] = {}
    data = _Substitution(file, index, env, base, read_secrets, secrets).value(data, ())
    if overrides:
        _apply_overrides(data, env, data_dir, file)
    try:
        model = root.model_validate(data)
    except ValidationError as exc:
        raise _convert(exc, root, data, index, file, secrets, read_secrets) from None
    unread = [] if read_secrets else sorted(set(secrets.values()))
    return _Loaded(model, file, index, unread)


# ------------------------------------------------------------------------------------ YAML

# The parser's problems in the product's words: (what the parser says, whether the place it
# names is where the construct began rather than where it noticed, what to tell the user).
_INDENTATION = (
    "this line's indentation does not fit the lines above: keys of one section start in one "
    "column, nested keys further right, and list items (`- `) line up under each other"
)
_YAML_PROBLEMS: tuple[tuple[str, bool, str], ...] = (
    (
        "mapping values are not allowed here",
        False,
        "a `:` where no key can start: this line is indented deeper than the keys beside it, "
        "the line above lacks its `:`, or a value holding `: ` needs quotes",
    ),
    (
        "could not find expected ':'",
        True,
        "this line is not `key: value`: add the `:` (and a space after it), or indent it under "
        "the key whose value it continues",
    ),
    ("expected <block end>", False, _INDENTATION),
    ("did not find expected key", False, _INDENTATION),
    ("did not find expected '-' indicator", False, _INDENTATION),
    ("found character '\\t'", False, "a tab: YAML indents with spaces only"),
    (
        "that cannot start any token",
        False,
        "a value cannot start with {character} unless it is quoted: put the value in quotes",
    ),
    (
        "expected '<document start>'",
        False,
        "a line that starts with `%` is a YAML directive: quote the value, or remove the line",
    ),
    ("found unexpected end of stream", True, "a quote opened here is never closed"),
    (
        "expected ',' or '}'",
        True,
        "a `{...}` mapping opened here is not closed, or two of its items lack a `,` between them",
    ),
    (
        "expected ',' or ']'",
        True,
        "a `[...]` list opened here is not closed, or two of its items lack a `,` between them",
    ),
    ("but found another document", False, "a second document (`---`): a config is one document"),
    (
        "found undefined alias",
        False,
        "`*name` refers to an anchor `&name` not defined above it (quote a value starting with *)",
    ),
    ("found unhashable key", False, "a key must be a plain word, not a list or a mapping"),
)


def _yaml_error(exc: yaml.MarkedYAMLError, file: str) -> ConfigError:
    problem = str(exc.problem or exc.context or exc)
    known = next(
        (
            (at_context, words)
            for says, at_context, words in _YAML_PROBLEMS
            if says in problem or (exc.context and says in exc.context)
        ),
        None,
    )
    if known is None:
        mark, words = exc.problem_mark or exc.context_mark, problem
    else:
        mark = (exc.context_mark if known[0] else None) or exc.problem_mark
        character = re.search(r"found character (\S+) that", problem)
        words = known[1].replace("{character}", character.group(1) if character else "it")
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    return ConfigError(f"not valid YAML: {words}", file=file, line=line, column=column)


def _parse_yaml(text: str, file: str) -> tuple[dict[str, Any], _Index]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, file) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=file, line=None) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict) or node is None:
        raise ConfigError(
            "the file must be a YAML mapping with an `appliance:` section", file=file, line=1
        )
    index, repeats = _Index(), list[ConfigError]()
    _index_node(node, (), index, repeats, file, set())
    if repeats:
        raise ConfigErrors(repeats)
    return data, index


def _position(mark: yaml.Mark) -> Position:
    return mark.line + 1, mark.column + 1


def _index_node(
    node: yaml.Node,
    path: KeyPath,
    index: _Index,
    repeats: list[ConfigError],
    file: str,
    open_nodes: set[int],
) -> None:
    if id(node) in open_nodes:  # an alias of a node that contains it
        return
    open_nodes.add(id(node))
    index.keys.setdefault(path, _position(node.start_mark))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, Position] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            at = (*path, key)
            where = _position(key_node.start_mark)
            if key in first and key != "<<":
                # YAML would keep the last silently: a pasted block overriding one above.
                repeats.append(
                    ConfigError(
                        f"key {key!r} is given twice in this section (first at line "
                        f"{first[key][0]}); remove one",
                        file=file,
                        key=format_key(at),
                        line=where[0],
                        column=where[1],
                    )
                )
            first.setdefault(key, where)
            index.keys[at] = where
            if isinstance(value_node, yaml.ScalarNode):
                index.values[at] = _position(value_node.start_mark)
            _index_node(value_node, at, index, repeats, file, open_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for number, item in enumerate(node.value):
            at = (*path, number)
            index.keys[at] = _position(item.start_mark)
            if isinstance(item, yaml.ScalarNode):
                index.values[at] = _position(item.start_mark)
            _index_node(item, at, index, repeats, file, open_nodes)
    open_nodes.discard(id(node))


# ---------------------------------------------------------------------------- substitution


@dataclass
class _Substitution:
    file: str
    index: _Index
    env: Mapping[str, str]
    base: Path
    read_secrets: bool
    secrets: dict[KeyPath, str]
    """Paths whose value came from a `${file:PATH}`, and the file (their value is never shown)."""

    def value(self, value: Any, path: KeyPath) -> Any:
        if isinstance(value, dict):
            return {k: self.value(v, (*path, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, (*path, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        return _SUBSTITUTION.sub(lambda match: self._replace(match, path), value)

    def _replace(self, match: re.Match[str], path: KeyPath) -> str:
        if match.group("file"):
            secret = Path(match.group("file").strip())
            secret = secret if secret.is_absolute() else self.base / secret
            self.secrets[path] = str(secret)
            if not self.read_secrets:
                return _SECRET_SHAPES.get(path[:-1], _UNREAD_SECRET)
            try:
                return secret.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or "not UTF-8 text"
                raise self._error(f"cannot read secret file {str(secret)!r}: {why}", path) from None
        var = match.group("var")
        if var in self.env:
            return self.env[var]
        if match.group("default") is not None:
            return match.group("default")
        raise self._error(
            f"environment variable {var} is not set (write ${{{var}:-default}} to give a default)",
            path,
        )

    def _error(self, message: str, path: KeyPath) -> ConfigError:
        return _located(message, self.file, path, self.index, value=True)


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


# --------------------------------------------------------------------- validation messages


def _convert(
    exc: ValidationError,
    root: type[BaseModel],
    data: dict[str, Any],
    index: _Index,
    file: str,
    secrets: Mapping[KeyPath, str],
    read_secrets: bool,
) -> ConfigErrors:
    errors: list[ConfigError] = []
    for error in exc.errors(include_url=False):
        path = key_path(error["loc"], data)
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path = (*path, "type")
        elif error["type"] == "missing" and path and isinstance(path[-1], int):
            # A short pair such as `[0.5]`: the list is what is wrong, not a position in it.
            size = len(get_args(model_at(root, path[:-1], data)))
            path, given = path[:-1], path[-1]
            error["type"] = "too_short"
            error["ctx"] = {"field_type": "Tuple", "min_length": size, "actual_length": given}
        message = message_for(error, path, root, data)
        # An error at a value that came from a secret file, or inside it.
        secret = next((secrets[p] for p in secrets if path[: len(p)] == p), None)
        if secret is not None:
            # The message may quote the value, which is a secret's content: name the file only.
            message = f"the value read from secret file {secret!r} is not valid here" + (
                ""
                if read_secrets
                else " (not read with --skip-file-checks: check it on the machine it is for)"
            )
        about_value = error["type"] not in ("extra_forbidden", "missing")
        errors.append(_located(message, file, path, index, value=about_value))
    return ConfigErrors(errors)


__all__ = [
    "PROFILES",
    "Checked",
    "check_config",
    "config_schema",
    "format_key",
    "load_config",
    "load_receiver_config",
    "parse_config",
    "profile_text",
    "receiver_config_schema",
]
