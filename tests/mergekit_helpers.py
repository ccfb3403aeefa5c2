"""Shared checks for the mergekit YAML tests (one home, used by every method's test file)."""

from __future__ import annotations

import logging
from typing import Any

from lightning_merge.mergekit import parse_config


def assert_ignored(config: dict[str, Any], without: dict[str, Any], caplog: Any, *keys: str) -> None:
    """``config`` parses with one warning that names every key in ``keys`` (parameters mergekit
    accepts and this method ignores) and gives the method and weights of ``without``."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_merge.mergekit.params"):
        got = parse_config(config)
    records = [r for r in caplog.records if r.name == "lightning_merge.mergekit.params" and "ignores" in r.message]
    assert len(records) == 1, [r.message for r in caplog.records]
    for key in keys:
        assert key in records[0].message, (key, records[0].message)
    want = parse_config(without)
    assert got.method == want.method and got.weights == want.weights and got.experts == want.experts
