"""Shared machinery of the job configs: strict pydantic models, YAML loading, `--a.b value` overrides,
and errors that list every problem at once."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from drivedit.storage import redact

M = TypeVar("M", bound="StrictModel")


class StrictModel(BaseModel):
    """Every section forbids unknown keys, so a typo is an error rather than a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A job config that cannot run. The message lists every problem, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        # problems quote URIs the user gave (and errors raised for them): never print a credential back
        super().__init__(redact(f"invalid config {source} ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}"))


def format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against `drivedit <job> --help`"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # a model_validator that found several problems joins them with newlines
        for part in msg.split("\n"):
            problems.append(part if loc == "(root)" else f"{loc}: {part}")
    return problems


def parse_override_value(text: str) -> Any:
    """Command-line values are YAML scalars or flow collections: `4`, `true`, `null`, `[a, b]`, `{k: v}`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--section.field value` / `--section.field=value` pairs to a nested dict."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError("command line", [f"expected --section.field VALUE, got {arg!r}"])
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError("command line", [f"--{key} needs a value"])
            raw = overrides[i + 1]
            i += 2
        node = data
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("command line", [f"--{key}: {part} is not a section"])
        node[parts[-1]] = parse_override_value(raw)
    return data


def valid_sections(model: type[BaseModel], raw: Any) -> SimpleNamespace:
    """Each top-level section of `raw` validated on its own: an attribute per section, None where that section is
    invalid. Lets a job check files (and what spans sections) even when another section has field errors."""
    out = {}
    for name, f in model.model_fields.items():
        sub = next((a for a in getattr(f.annotation, "__args__", (f.annotation,))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        value = raw.get(name) if isinstance(raw, dict) else None
        try:
            if sub is None:
                out[name] = value
            elif value is None:
                out[name] = None if f.is_required() else f.get_default(call_default_factory=True)
            else:
                out[name] = sub.model_validate(value)
        except ValidationError:
            out[name] = None
    return SimpleNamespace(**out)


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None, checks: Callable[[SimpleNamespace], list[str]] | None = None) -> M:
    """Load YAML (or a dict), apply overrides, validate. Raises ConfigError listing every problem.

    `checks` (the job's file and cross-section checks, given `valid_sections`) runs when fields are invalid,
    so one error lists the field errors and the problems with the files together; a config whose fields
    are valid is checked by the job itself before it starts."""
    source = str(path) if path else "(defaults)"
    raw = read_raw_config(path, overrides, data)
    if checks is None:
        return validate_config(model, raw, source)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e) + checks(valid_sections(model, raw))) from None


def read_raw_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    data: dict | None = None) -> dict:
    """The YAML file's mapping (or `data`) with overrides applied, not yet validated: for a job that
    checks more than the schema before it lists the problems (finetune's preflight)."""
    source = str(path) if path else "(defaults)"
    raw: dict = dict(data or {})
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(source, [f"config file not found: {p}"])
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(source, [f"not valid YAML: {e}"]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(source, ["the top level must be a mapping of sections"])
        raw.update(loaded)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return raw


def validate_config(model: type[M], raw: dict, source: str = "(dict)") -> M:
    """Validate plain data, e.g. what a Ray worker received as `model_dump(mode="json")`."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e)) from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the shape MLflow params want."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def field_help_lines(model: type[BaseModel], prefix: str = "") -> list[str]:
    """`--help` text of a job config: a header per section, then `--section.field  description (default)`."""
    lines: list[str] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
        if sub is not None:
            lines.append(f"\n[{prefix}{name}] {f.description or ''}")
            lines += field_help_lines(sub, f"{prefix}{name}.")
        else:
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            lines.append(f"  --{prefix}{name}  {f.description or ''} ({default})")
    return lines
