"""Resolving a config: preset, then a TOML file, then `--set` overrides; strict validation; TOML save/load and
diffs between configs."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any, get_args

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


def _annotation(parts: list[str]) -> Any:
    """The type of the config key `parts` (e.g. ["data", "path"]), or None for an unknown key."""
    model: Any = Config
    for part in parts[:-1]:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return None
        model = info.annotation
    info = getattr(model, "model_fields", {}).get(parts[-1])
    return None if info is None else info.annotation


def _is_text_field(parts: list[str]) -> bool:
    """Whether the config key `parts` holds text: `--set data.path=2024` is the string "2024", not a number."""
    return _annotation(parts) in (str, str | None)


def _none_is_a_choice(parts: list[str]) -> bool:
    """Whether "none" is one of the key's named choices (privacy.mode=none) rather than "no value"."""
    return "none" in get_args(_annotation(parts))


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
        if text.lower() == "none" and not _none_is_a_choice(parts):
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


# The record-level mechanism of each algorithm: what a privacy budget without a privacy mode means
RECORD_LEVEL_MODES = {"feddm": "dp-sgd", "pga": "dp-sgd", "merf": "dp-release"}
DP_RECIPE = "dp-fmnist-quick"  # what `fedgen train` builds on when it is given a privacy budget and nothing else


def privacy_defaults(raw: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """`raw` with its privacy mode filled in where a budget (privacy.target_epsilon or privacy.noise_multiplier)
    is set without one: the algorithm's record-level mechanism. Returns the note that says so (None if nothing
    was filled in)."""
    privacy = raw.get("privacy") or {}
    budget = privacy.get("target_epsilon") is not None or privacy.get("noise_multiplier") is not None
    if not budget or "mode" in privacy:
        return raw, None
    algorithm = raw.get("algorithm", "feddm")
    mode = RECORD_LEVEL_MODES.get(algorithm, "dp-sgd")
    raw = copy.deepcopy(raw)
    raw["privacy"]["mode"] = mode
    note = f"a privacy budget without privacy.mode: record-level {mode} (algorithm={algorithm})"
    if algorithm != "merf":
        note += f"; the measured DP recipe is --preset {DP_RECIPE} (docs/PERFORMANCE.md)"
    return raw, note


def load(preset_name: str | None = None, config_path: Path | None = None,
         overrides: list[str] | None = None, notes: list[str] | None = None) -> Config:
    """Resolve a config: preset (or defaults), then a TOML file, then `--set` overrides. A privacy budget without
    a mode gets the algorithm's record-level mode (privacy_defaults), with a line in `notes`."""
    raw: dict[str, Any] = preset(preset_name) if preset_name else {}
    if config_path is not None:
        try:
            raw = deep_update(raw, tomllib.loads(Path(config_path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {config_path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_path} is not valid TOML: {exc}") from None
    raw, note = privacy_defaults(apply_overrides(raw, overrides or []))
    if note is not None and notes is not None:
        notes.append(note)
    return validate(raw)


def to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude_none=True)


def to_toml(cfg: Config) -> str:
    """Every setting of `cfg` as TOML: what config.toml holds, and a config file that loads back as `cfg`."""
    return tomli_w.dumps(to_dict(cfg))


def save(cfg: Config, path: Path) -> None:
    data = to_toml(cfg)
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
