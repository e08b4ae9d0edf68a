"""Resolving a config: preset, then a TOML file, then `--set` overrides; strict validation; TOML save/load and
diffs between configs."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from fedgen.config.presets import PRESETS, deep_update
from fedgen.config.schema import Config, ConfigError


def _parse_value(text: str) -> Any:
    """A `--set` value: TOML syntax where it parses (numbers, booleans, arrays), else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _is_text_field(parts: list[str]) -> bool:
    """Whether the config key `parts` (e.g. ["data", "path"]) holds text: `--set data.path=2024` is the string
    "2024", not a number."""
    model: Any = Config
    for part in parts[:-1]:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return False
        model = info.annotation
    info = getattr(model, "model_fields", {}).get(parts[-1])
    return info is not None and info.annotation in (str, str | None)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. fl.rounds=20), got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        text = value.strip()
        if text.lower() == "none":
            node[parts[-1]] = None
        else:
            node[parts[-1]] = text if _is_text_field(parts) else _parse_value(text)
    return raw


def validate(raw: dict[str, Any]) -> Config:
    """A Config from plain values (TOML, --set, JSON), strictly typed: `rounds = "3"` is refused like
    `--set fl.rounds=abc`, never coerced."""
    try:
        return Config.model_validate_json(json.dumps(raw), strict=True)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "config"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"  {field}: {msg}" if err["loc"] else "  " + msg.replace("\n", "\n  "))
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name]) | {"name": name}


def load(preset_name: str | None = None, config_path: Path | None = None,
         overrides: list[str] | None = None) -> Config:
    """Resolve a config: preset (or defaults), then a TOML file, then `--set` overrides."""
    raw: dict[str, Any] = preset(preset_name) if preset_name else {}
    if config_path is not None:
        try:
            raw = deep_update(raw, tomllib.loads(Path(config_path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {config_path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_path} is not valid TOML: {exc}") from None
    return validate(apply_overrides(raw, overrides or []))


def to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude_none=True)


def save(cfg: Config, path: Path) -> None:
    data = tomli_w.dumps(to_dict(cfg))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data)
    tmp.replace(path)


def read(path: Path) -> Config:
    return load(config_path=path)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as `section.key -> value`."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Flattened `section.key -> (old, new)` for every differing value."""
    a = flatten(old.model_dump(mode="json"))
    b = flatten(new.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
