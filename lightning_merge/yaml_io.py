"""Strict YAML reading for configs: duplicate keys and syntax errors are reported as FILE:LINE:COLUMN.

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, so a config that sets
``density`` twice silently merges with the second value. :class:`StrictLoader` refuses any
duplicate key in any mapping, naming both lines; syntax errors name the file (not PyYAML's
``<unicode string>``), the line and the column.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["StrictLoader", "load_yaml"]


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys."""

    source = "<string>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let the base class report it
                continue
            if first is not None:
                mark = key_node.start_mark
                raise ConfigError(
                    f"{self.source}:{mark.line + 1}:{mark.column + 1}: duplicate key '{key}' (first set on line "
                    f"{first.start_mark.line + 1}); a key may appear once in a mapping: keep one of them"
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _position(path: str, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read one YAML mapping from ``path`` (ConfigError: missing file, bad YAML, duplicate keys,
    several documents, or not a mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist" if not p.exists() else
                          f"config file '{path}' is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the config as UTF-8") \
            from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None

    class _Loader(StrictLoader):
        source = str(path)

    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]  # noqa: S506 (safe loader)
    except yaml.YAMLError as e:
        raise ConfigError(_position(str(path), e)) from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        what = f"{len(docs)} documents" if len(docs) != 1 else f"a {type(docs[0]).__name__}"
        raise ConfigError(
            f"{path}: expected one YAML mapping with 'merge_method', 'models', ... (got {what}); "
            "multi-document (mergekit-mega) files are not supported"
        )
    return docs[0]
