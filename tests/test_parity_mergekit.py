"""Parity with mergekit 0.1.5: the same YAML through mergekit and through ``lightning-merge merge``.

Deterministic methods must give the same tensors (float32 rounding aside). DARE and DELLA draw
their masks from different generators, so they are compared in distribution, per tensor of at
least 16k entries (hidden size 128):

* the fraction of entries changed from the base: |Δ| ≤ 5·sqrt(2 p (1 − p) / n);
* the mean of merged − base: |Δ| ≤ 5·sqrt(2)·std / sqrt(n) (the sample mean's spread over masks
  is at most std / sqrt(n));
* the std of merged − base: within 3 % (the spread between seeds is about 0.5 %);

and, with a single expert, exactly what mergekit 0.1.5's ``rescale: true`` means (the L1 norm of
the kept delta equals the original's) and DELLA's keep probabilities through the mean |δ| of the
kept entries, which moves by about 0.08 per 0.1 of mergekit ``epsilon`` (a missing ×2 is caught).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("mergekit")
pytestmark = pytest.mark.parity

from safetensors.torch import load_file  # noqa: E402

from lightning_merge.cli import main  # noqa: E402


def _llama_cfg(hidden: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


def _make_models(root: Path, hidden: int) -> Path:
    """base/ and e0, e1, e2 = base + N(0, (0.01 (i + 1))²) noise, float32."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(_llama_cfg(hidden))
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for i in range(3):
        m = LlamaForCausalLM(_llama_cfg(hidden))
        m.load_state_dict({k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=gen)
                           for k, v in base.state_dict().items()})
        m.save_pretrained(root / f"e{i}")
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return _make_models(tmp_path_factory.mktemp("mk_small"), 32)


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    return _make_models(tmp_path_factory.mktemp("mk_large"), 128)


def _resolve(config: dict, root: Path) -> dict:
    """Model names -> absolute paths (so both tools read the same files from any working directory)."""
    def path(p: str) -> str:
        return str(root / p)

    out = dict(config)
    if "base_model" in out:
        out["base_model"] = path(out["base_model"])
    out["models"] = [{**m, "model": path(m["model"])} for m in config["models"]]
    return out


def run_mergekit(config: dict, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    shutil.rmtree(out, ignore_errors=True)
    options = MergeOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False,
                           random_seed=seed)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return _load(out)


def run_ours(config: dict, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(config))
    shutil.rmtree(out, ignore_errors=True)
    assert main(["merge", str(cfg), str(out), "--seed", str(seed), "--no-progress"]) == 0
    return _load(out)


def _load(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(out / f))
    return tensors


def W(weight, **params) -> dict:  # noqa: N802
    return {"weight": weight, **params}


def M(name: str, **params) -> dict:  # noqa: N802
    return {"model": name, "parameters": params} if params else {"model": name}


THREE = [M("e0", weight=1.0), M("e1", weight=0.5), M("e2", weight=0.25)]

DETERMINISTIC = {
    "linear": {"merge_method": "linear", "models": THREE},
    "linear_with_base_model": {"merge_method": "linear", "base_model": "base", "parameters": {"weight": 0.3},
                               "models": THREE[:2]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "models": THREE,
                        "parameters": {"lambda": 0.7}},
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5, "lambda": 1.2},
             "models": [M("e0", weight=1.0), M("e1", weight=0.5, density=0.3), M("e2", weight=[0.2, 0.9])]},
    "ties_filters": {
        "merge_method": "ties", "base_model": "base",
        "parameters": {"density": [{"filter": "mlp", "value": [0.2, 0.8]}, {"filter": "self_attn", "value": 0.4},
                                   {"value": 0.6}]},
        "models": [M("base"), M("e0", weight=1.0),
                   M("e1", weight=[{"filter": "q_proj", "value": 2.0}, {"value": 0.5}]), M("e2", weight=0.25)],
    },
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base", "models": THREE,
                    "parameters": {"density": 0.8, "gamma": 0.05}},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base", "models": THREE,
                         "parameters": {"density": 0.8, "gamma": 0.05, "normalize": True}},
    "model_stock": {"merge_method": "model_stock", "base_model": "base",
                    "models": [M("e0"), M("e1"), M("e2")]},
    "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": "base",
                                "models": [M("e0"), M("e1"), M("e2")], "parameters": {"filter_wise": True}},
    "slerp": {"merge_method": "slerp", "base_model": "base", "models": [M("base"), M("e1")],
              "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                                   {"filter": "mlp", "value": [1.0, 0.3]}, {"value": 0.4}]}},
    # density 1: DARE and DELLA are deterministic
    "dare_ties_density_1": {"merge_method": "dare_ties", "base_model": "base", "models": THREE},
    "dare_linear_density_1": {"merge_method": "dare_linear", "base_model": "base", "models": THREE,
                              "parameters": {"density": 1.0, "lambda": 0.8}},
    "della_density_1": {"merge_method": "della", "base_model": "base", "models": THREE,
                        "parameters": {"density": 1.0, "epsilon": 0.1}},
    "della_linear_density_1": {"merge_method": "della_linear", "base_model": "base", "models": THREE,
                               "parameters": {"normalize": True}},
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_methods_match(name, small, tmp_path):
    config = _resolve(DETERMINISTIC[name], small)
    ref = run_mergekit(config, tmp_path / "mergekit")
    ours = run_ours(config, tmp_path / "ours")
    assert set(ours) == set(ref)
    for k, r in ref.items():
        assert ours[k].dtype == r.dtype, k
        scale = max(1.0, float(r.abs().max()))
        err = float((ours[k].double() - r.double()).abs().max())
        assert err <= 1e-6 * scale, f"{name}: {k} differs by {err:.3g}"


RANDOM = {
    "dare_linear": {"merge_method": "dare_linear", "parameters": {"density": 0.4}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.4, "lambda": 1.1}},
    "della": {"merge_method": "della", "parameters": {"density": 0.4, "epsilon": 0.1}},
    "della_linear": {"merge_method": "della_linear", "parameters": {"density": 0.6, "epsilon": 0.2}},
}


def _stats(merged: dict, base: dict) -> dict[str, tuple[int, float, float, float]]:
    out = {}
    for k, v in merged.items():
        if v.numel() < 16384:
            continue
        d = (v.double() - base[k].double()).flatten()
        out[k] = (d.numel(), float((d != 0).double().mean()), float(d.mean()), float(d.std()))
    return out


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_methods_match_in_distribution(name, large, tmp_path):
    config = _resolve({**RANDOM[name], "base_model": "base", "models": [
        M("e0", weight=1.0), M("e1", weight=0.5), M("e2", weight=0.8)]}, large)
    base = _load(large / "base")
    ref = _stats(run_mergekit(config, tmp_path / "mergekit"), base)
    ours = _stats(run_ours(config, tmp_path / "ours"), base)
    assert set(ref) == set(ours) and len(ref) >= 8
    for k, (n, frac_r, mean_r, std_r) in ref.items():
        _, frac_o, mean_o, std_o = ours[k]
        assert abs(frac_o - frac_r) <= 5 * (2 * frac_r * (1 - frac_r) / n) ** 0.5 + 1e-12, (k, frac_o, frac_r)
        assert abs(mean_o - mean_r) <= 5 * 2**0.5 * std_r / n**0.5, (k, mean_o, mean_r)
        assert abs(std_o / std_r - 1) <= 0.03, (k, std_o, std_r)


@pytest.mark.parametrize("method,epsilon", [("della_linear", 0.2), ("della_linear", 0.05), ("dare_linear", None)])
def test_single_expert_rescale_and_keep_probabilities(method, epsilon, large, tmp_path):
    params = {"density": 0.5} | ({} if epsilon is None else {"epsilon": epsilon})
    config = _resolve({"merge_method": method, "base_model": "base", "models": [M("e0", weight=1.0)],
                       "parameters": params}, large)
    base, expert = _load(large / "base"), _load(large / "e0")
    k = "model.layers.0.mlp.up_proj.weight"  # 256 x 128
    delta = (expert[k] - base[k]).double()
    # keep probabilities: mergekit's formula with the YAML's half-width e
    e = epsilon or 0.0
    ranks = delta.abs().argsort(1).argsort(1).double()
    q = (0.5 - e) + 2 * e * ranks / (delta.shape[1] - 1)
    expected_ratio = float((q * delta.abs()).sum() / q.sum() / delta.abs().mean())
    for who, merged in (("mergekit", run_mergekit(config, tmp_path / "mergekit")),
                        ("ours", run_ours(config, tmp_path / "ours"))):
        d = merged[k].double() - base[k].double()
        kept = d != 0
        # rescale: true in 0.1.5 = L1 norm matching of the whole tensor
        assert float(d.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5), who
        ratio = float(delta.abs()[kept].mean() / delta.abs().mean())
        assert ratio == pytest.approx(expected_ratio, abs=0.02), (who, ratio, expected_ratio)
        assert float(kept.double().mean()) == pytest.approx(0.5, abs=5 * (0.25 / delta.numel()) ** 0.5), who
