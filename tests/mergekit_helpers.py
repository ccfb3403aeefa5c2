"""The fixtures layer of the mergekit tests: the ignored-parameter check, the parity runners and
the float32-rounding comparison (one home, used by every method's test file)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

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


TESTS = Path(__file__).resolve().parent


def parity_module() -> Any:
    """tests/test_parity_mergekit.py (the tiny-model factory and both tools' runners), or a skip
    when mergekit is not installed."""
    pytest.importorskip("mergekit")
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import test_parity_mergekit

    return test_parity_mergekit


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-6) -> None:
    """|ours − ref| ≤ rel · max(1, max|ref|): float32 rounding of the same computation."""
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    err = float((ours.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    assert ours.shape == ref.shape and err <= rel * scale, f"{what}: differs by {err:.3g}"


def run_both(config: dict[str, Any], tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run a resolved config through mergekit 0.1.5 and ``lightning-merge merge``; the outputs
    have the same tensor names and dtypes (values are the caller's to compare)."""
    p = parity_module()
    ref = p.run_mergekit(config, tmp_path / "mergekit")
    ours = p.run_ours(config, tmp_path / "ours")
    assert set(ours) == set(ref)
    for k, r in ref.items():
        assert ours[k].dtype == r.dtype, k
    return ours, ref


def assert_parity(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], label: str,
                  base: dict[str, torch.Tensor] | None = None) -> bool:
    """Every tensor of ``ours`` equals mergekit's ``ref`` to float32 rounding; returns whether
    mergekit's output differs from ``base`` anywhere (so that a test can require a real merge)."""
    for k, r in ref.items():
        assert_close_scaled(ours[k], r, f"{label}: {k}")
    return base is not None and any(not torch.equal(r, base[k]) for k, r in ref.items())


def mergekit_config(method: str, base: str | None = "base", models: Any = ("e0", "e1"), **params: Any) -> dict:
    """``{merge_method, base_model, models: [{model}], parameters}`` for the YAML tests."""
    out: dict[str, Any] = {"merge_method": method, "models": [{"model": m} for m in models]}
    if base is not None:
        out["base_model"] = base
    if params:
        out["parameters"] = params
    return out
