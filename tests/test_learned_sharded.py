"""``LearnedMerge`` under a real ``Trainer(strategy=ModelParallelStrategy(...))`` with 2 and 3 CPU
processes (gloo): the model is built on the meta device, sharded with FSDP2, each rank reads only
its shards' rows of the base folder, each rank's bank holds only its rows, and the coefficients
equal a 1-process fit over the same global batches.

Tolerance. The ranks reduce the coefficient gradients in another order (per-rank sums over their
rows, then an all-reduce): the first step's gradient agrees to ~5e-10 absolute. Adam divides by
√v, so an entry whose gradient is ~1e-7 moves by about lr either way and small differences grow:
after 4 steps (lr 0.05) coefficients agree to < 1e-4 (measured 4e-6 at 2 ranks, 4e-5 at 3), and
a wrong gradient (a missing rank's rows, a doubled regularizer) moves them by > 1e-2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_learned_helpers import make_zoo

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded_learned_zoo")
    make_zoo(root)
    return root


def fit(zoo: Path, out: Path, world: int, granularity: str, objective: str, resume: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [sys.executable, str(HERE / "learned_sharded_script.py"), str(zoo), str(out), str(world), granularity,
            objective] + (["resume"] if resume else [])
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def coefficients(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"rank{rank}.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_column_dam_on_two_shards_equals_one_process(zoo, tmp_path):
    one = fit(zoo, tmp_path / "one", 1, "column", "dam")
    two = fit(zoo, tmp_path / "two", 2, "column", "dam")
    ref = coefficients(one)
    assert_close(coefficients(two, 0), coefficients(two, 1), 0.0)  # identical on both ranks
    assert_close(coefficients(two), ref, 1e-4)
    moved = max((v - v.flatten()[0]).abs().max().item() for v in ref.values())
    assert moved > 1e-2  # the fit changed the coefficients
    # each rank holds about half of θ₀ and of the task vectors; together exactly the 1-process bank
    full = json.loads((one / "bank0.json").read_text())
    parts = [json.loads((two / f"bank{r}.json").read_text()) for r in range(2)]
    assert not full["sharded"] and all(p["sharded"] for p in parts)
    assert sum(p["base"] for p in parts) == full["base"] and sum(p["deltas"] for p in parts) == full["deltas"]
    assert all(p["base"] < 0.6 * full["base"] and p["deltas"] < 0.6 * full["deltas"] for p in parts)
    # the model was a meta-device skeleton until configure_model; then each rank read only its
    # shards' rows of the folder's tensors (together the whole model, none of it twice)
    metas = [json.loads((d / f"meta{r}.json").read_text()) for d, r in ((one, 0), (two, 0), (two, 1))]
    assert all(m["meta_at_start"] and m["buffers_real"] and m["rows_equal"] for m in metas), metas
    assert not metas[0]["sharded"] and metas[0]["local_numel"] == metas[0]["full_numel"]
    assert metas[1]["sharded"] and metas[1]["local_numel"] + metas[2]["local_numel"] == metas[0]["full_numel"]
    assert all(m["local_numel"] < 0.6 * m["full_numel"] for m in metas[1:])
    # the export (gathered on rank 0) is the merged model of the 1-process run
    a, b = load_file(str(one / "export" / "model.safetensors")), load_file(str(two / "export" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-3, rtol=0), k
    assert (two / "export" / "learned_coefficients" / "coefficients.safetensors").is_file()
    assert (two / "ckpt" / "last.ckpt" / "meta.pt").is_file()  # a distributed checkpoint folder


@pytest.mark.slow
def test_tensor_entropy_on_three_shards_resumes_from_checkpoint_folder(zoo, tmp_path):
    fit(zoo, tmp_path / "w3" / "first", 3, "tensor", "entropy")
    resumed = fit(zoo, tmp_path / "w3" / "second", 3, "tensor", "entropy", resume=True)
    fit(zoo, tmp_path / "w1" / "first", 1, "tensor", "entropy")
    ref = fit(zoo, tmp_path / "w1" / "second", 1, "tensor", "entropy", resume=True)
    for r in range(3):
        assert_close(coefficients(resumed, r), coefficients(ref), 1e-4)
    first = coefficients(tmp_path / "w3" / "first")
    assert max((first[k] - coefficients(resumed)[k]).abs().max().item() for k in first) > 1e-2  # it trained on
    uneven = [json.loads((resumed / f"bank{r}.json").read_text())["base"] for r in range(3)]
    assert len(set(uneven)) > 1  # the rows do not split evenly over 3 ranks
    metas = [json.loads((resumed / f"meta{r}.json").read_text()) for r in range(3)]  # uneven rows, read from meta
    assert all(m["meta_at_start"] and m["rows_equal"] and m["sharded"] for m in metas), metas
    assert sum(m["local_numel"] for m in metas) == metas[0]["full_numel"]


def sens(zoo: Path, out: Path, world: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, str(HERE / "learned_sharded_script.py"), str(zoo), str(out), str(world),
                          "sens"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def test_sens_calibration_on_two_shards_equals_one_process(zoo, tmp_path):
    """SensMergeCallback calibrates on the FSDP2 module (each rank |w ⊙ g| of its rows, summed) and
    merges into the shards: factors and weights as in 1 process (float32 summation order: ~5e-8)."""
    one, two = sens(zoo, tmp_path / "one", 1), sens(zoo, tmp_path / "two", 2)
    a, b = (json.loads((d / "factors.json").read_text()) for d in (one, two))
    for key in ("sensitivity", "distance", "sigma"):
        x, y = torch.tensor(a[key]), torch.tensor(b[key])
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (key, (x - y).abs().max())
    assert len({round(v, 4) for row in a["sigma"] for v in row}) > 1  # not uniform: the calibration mattered
    wa, wb = load_file(str(one / "merged.safetensors")), load_file(str(two / "merged.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
