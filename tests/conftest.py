"""Test-wide settings: one torch thread (the suite shares 2 cores), offline Hugging Face."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "docs" / "vectors.json"
LOCAL = Path(__file__).resolve().parent / "data" / "vectors.json"


@pytest.fixture(scope="session")
def vectors() -> dict:
    """The spec's worked test vectors (a copy lives in tests/data so a clone is self-contained)."""
    return json.loads(LOCAL.read_text())


@pytest.fixture
def tau_inputs(vectors):
    """Fresh tensors for every test: methods own their inputs and may overwrite them."""
    base = torch.tensor(vectors["inputs"]["base"], dtype=torch.float32)
    taus = [torch.tensor(t, dtype=torch.float32) for t in vectors["inputs"]["tau"]]
    return base, taus


@pytest.fixture(scope="session")
def llamas(tmp_path_factory) -> Path:
    """Tiny Llama HF folders ``base``, ``e0``-``e2`` (hidden 32) for the mergekit parity tests of
    every method; skipped without mergekit (the factory lives in tests/test_parity_mergekit.py)."""
    from mergekit_helpers import parity_module

    return parity_module()._make_models(tmp_path_factory.mktemp("mergekit_models"), 32)
