"""Typed configs: pydantic models, YAML files, dotted ``key=value`` overrides, all errors at once.

Every config section is a :class:`Section` (unknown keys forbidden, one-line ``description`` per field).
:func:`load_config` reads a YAML file, applies overrides such as ``sampling.num_steps=10``, validates, and
raises one :class:`ConfigError` listing every problem with the nearest valid key for each unknown one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """One or more config problems, each naming the key, the value, the rule and the fix."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (sub)model that owns ``loc``'s last element."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}))


def _format_error(model: type[BaseModel], err: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(model, loc)
        near = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = (
            f"did you mean '{'.'.join(loc[:-1] + (near[0],))}'?"
            if near
            else f"valid keys: {', '.join(valid)}"
        )
        return f"{key}: unknown key; {hint}"
    return f"{key} = {err.get('input')!r}: {err['msg']}"


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value (e.g. sampling.num_steps=10)")
            continue
        key, raw = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    if problems:
        raise ConfigError(problems, "command-line overrides")
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML), apply dotted ``overrides``, validate into ``model``; all errors at once."""
    data: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(
                [f"config file {str(path)!r} does not exist: pass an existing YAML (see configs/)"]
            )
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: top level must be a mapping of sections, got {type(data).__name__}"])
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_format_error(model, err) for err in e.errors()], source) from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
