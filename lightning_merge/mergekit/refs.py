"""mergekit's model references: ``path``, ``path+adapter``, ``{model, lora}``, and the ``models:`` list.

Relative paths are read relative to the working directory (as mergekit does), else relative to the
YAML file's folder (:class:`PathResolver`). Reads no tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .settings import check_setting

__all__ = ["Entry", "PathResolver", "is_adapter", "model_entries", "model_ref", "resolve_base", "split_ref"]


@dataclass(frozen=True)
class Entry:
    path: str
    params: dict[str, Any]
    key: str  # the YAML key of its parameters, for messages



def model_ref(entry: Any, key: str) -> tuple[str, str | None]:
    """mergekit's ModelReference: "path", "path+lora", or {model: path, lora: path}."""
    if isinstance(entry, str):
        return entry, None
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{key}: expected a model path, got {entry!r}")
    unknown = sorted(set(entry) - {"model", "lora", "override_architecture"})
    if unknown or "model" not in entry:
        raise ConfigError(f"{key}: expected a path or {{model: PATH, lora: PATH}}, got keys {sorted(entry)}")
    if entry.get("override_architecture"):
        raise ConfigError(f"{key}.override_architecture: not supported; remove it")

    def path_of(v: Any, k: str) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, Mapping) and isinstance(v.get("path"), str):
            if v.get("revision"):
                raise ConfigError(f"{k}.revision: lightning_merge reads local files only; download that "
                                  "revision and give its folder")
            return v["path"]
        raise ConfigError(f"{k}: expected a path, got {v!r}")

    lora = entry.get("lora")
    return path_of(entry["model"], f"{key}.model"), None if lora is None else path_of(lora, f"{key}.lora")


class PathResolver:
    def __init__(self, config_dir: Path | None):
        self.config_dir = config_dir

    def __call__(self, p: str) -> str:
        """A relative path as given when it exists (relative to the working directory, like
        mergekit), else relative to the YAML file's folder when it exists there."""
        if os.path.isabs(p) or os.path.exists(p) or self.config_dir is None:
            return p
        alt = self.config_dir / p
        return str(alt) if alt.exists() else p

    @staticmethod
    def same(a: str, b: str) -> bool:
        if a == b:
            return True
        if os.path.exists(a) and os.path.exists(b):
            return os.path.realpath(a) == os.path.realpath(b)
        return os.path.normpath(a) == os.path.normpath(b)


def split_ref(raw: str, lora: str | None, key: str, paths: PathResolver) -> tuple[str, str | None]:
    """"base+adapter" -> (base path, adapter path); a path that exists is never split."""
    if lora is None and "+" in raw and not os.path.exists(paths(raw)):
        parts = raw.split("+")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{key}: cannot parse {raw!r}; use MODEL or MODEL+ADAPTER")
        raw, lora = parts
    if "@" in raw and not os.path.exists(paths(raw)):
        raise ConfigError(f"{key}: {raw!r} names a hub revision; lightning_merge reads local files only")
    return paths(raw), None if lora is None else paths(lora)


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def resolve_base(value: Any, paths: PathResolver) -> str | None:
    if value is None:
        return None
    raw, lora = model_ref(value, "base_model")
    base, adapter = split_ref(raw, lora, "base_model", paths)
    if adapter is not None:
        raise ConfigError("base_model: a 'model+adapter' base is not supported; merge the adapter into the "
                          "model first (peft merge_and_unload) and give that folder")
    if is_adapter(base):
        raise ConfigError(f"base_model: '{base}' is a PEFT adapter folder; give the full pre-trained model")
    return base


def model_entries(
    models: Any, base_ref: str | None, paths: PathResolver
) -> tuple[list[Entry], list[bool]]:
    if not isinstance(models, list) or not models:
        raise ConfigError("models: missing or empty; list the models to merge as '- model: PATH'")
    entries: list[Entry] = []
    is_base: list[bool] = []
    for i, m in enumerate(models):
        key = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, Mapping) or "model" not in m:
            raise ConfigError(f"{key}: expected {{model: PATH, parameters: {{...}}}}, got {m!r}")
        extra = sorted(set(m) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"{key}: unknown key(s) {extra}; a model entry has 'model' and 'parameters'")
        raw, lora = model_ref(m["model"], f"{key}.model")
        path, adapter = split_ref(raw, lora, f"{key}.model", paths)
        if adapter is not None:
            if base_ref is None or not PathResolver.same(path, base_ref):
                raise ConfigError(
                    f"{key}.model: '{path}+{adapter}' applies an adapter to a model other than base_model; "
                    "only BASE+ADAPTER with BASE = base_model is supported (the adapter then is a delta "
                    "expert); otherwise merge the adapter into its model first (peft merge_and_unload)"
                )
            path = adapter
        params = m.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{key}.parameters: expected a mapping of parameter -> value")
        for pk, pv in params.items():
            check_setting(pv, f"{key}.parameters.{pk}")
        for prev in entries:
            if PathResolver.same(prev.path, path):
                raise ConfigError(f"{key}.model: '{path}' is listed twice (also in "
                                  f"{prev.key.removesuffix('.parameters')}); list each model once")
        entries.append(Entry(path, dict(params), f"{key}.parameters"))
        is_base.append(adapter is None and base_ref is not None and PathResolver.same(path, base_ref))
    return entries, is_base


