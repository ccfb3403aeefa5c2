"""Merging into FSDP2-sharded modules: real gloo process groups and ``fully_shard`` on CPU, 2 and 3
ranks (uneven shards and an empty one). The weights every rank ends with equal a 1-process
``merge_models`` of the same inputs with the same seed, for every registered method."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from sharded_workers import experts_for, make_zoo, parity_worker

from lightning_merge import get_method, merge_models, method_names

METHODS = [n for n in method_names() if n != "sens_scaled"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return make_zoo(tmp_path_factory.mktemp("sharded_zoo"))


# 3 ranks (uneven shards) is the heavier case: `make test-all` runs it
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_every_method_into_shards_equals_one_process(zoo, tmp_path, world):
    mp.spawn(parity_worker, args=(world, free_port(), zoo, METHODS, str(tmp_path)), nprocs=world, join=True)
    base = load_file(zoo["base"])
    for name in METHODS:
        experts = experts_for(name, [zoo["e0"], zoo["e1"]])
        want = merge_models(zoo["base"], experts, get_method(name), seed=7)
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert set(got) == set(want), name
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
        assert any(not torch.equal(got[k], base[k]) for k in base), name  # the merge changed something
    want = merge_models(zoo["base"], [zoo["e0"], zoo["e1"]], get_method("ties"), seed=7)
    got = load_file(str(tmp_path / "ties_base_file.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    restored = load_file(str(tmp_path / "restored.safetensors"))
    assert all(torch.equal(restored[k], base[k]) for k in base)
    # task_arithmetic takes the element-wise route: the ranks together read every expert byte once
    full = [sum(v.numel() * v.element_size() for v in load_file(zoo[e]).values()) for e in ("e0", "e1")]
    read = [torch.load(tmp_path / f"bytes_read_rank{r}.pt") for r in range(world)]
    assert [sum(r[i] for r in read) for i in range(2)] == full
    assert all(r[i] < full[i] for r in read for i in range(2))
    held = [torch.load(tmp_path / f"nonempty_rank{r}.pt") for r in range(world)]
    if world == 3:  # the 2-row head leaves the last rank an empty shard; 33 rows split unevenly
        assert held[2]["head.weight"] is False and held[0]["head.weight"] is True


def _script(mode: str, zoo: dict[str, str], out: Path, world: int) -> str:
    import os
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, str(here / "sharded_fit_script.py"), mode, str(Path(zoo["base"]).parent),
                          str(out), str(world)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stderr


def test_model_parallel_strategy_merges_into_meta_built_shards_then_fits_and_resumes(zoo, tmp_path):
    """A real Trainer with ModelParallelStrategy on 2 CPU ranks: the module is built on the meta device
    and sharded in configure_model; the merge lands in the shards (equal to merge_models); the fit
    trains from it; a resume from the distributed checkpoint folder keeps the trained weights."""
    from lightning_merge import Ties

    want = merge_models(zoo["base"], [zoo["e0"], zoo["e1"]], Ties(density=0.5), seed=3)
    _script("validate", zoo, tmp_path, 2)
    got = load_file(str(tmp_path / "validate_validated.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    _script("fit", zoo, tmp_path, 2)
    start = load_file(str(tmp_path / "fit_train_start.safetensors"))
    end = load_file(str(tmp_path / "fit_train_end.safetensors"))
    assert all(torch.equal(start[k], want[k]) for k in want)
    assert any(not torch.equal(end[k], start[k]) for k in want)  # it trained
    assert (tmp_path / "ckpt" / "last.ckpt" / "meta.pt").is_file()  # a distributed checkpoint folder
    log = _script("resume", zoo, tmp_path, 2)
    resumed = load_file(str(tmp_path / "resume_train_start.safetensors"))
    assert all(torch.equal(resumed[k], end[k]) for k in end)  # the trained weights, not a new merge
    assert "already holds this merge" in log
    assert "merged=True" in (tmp_path / "resume_merge_state.txt").read_text()


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_merge_search_under_model_parallel_strategy_chooses_as_one_process(zoo, tmp_path, world):
    """MergeSearch under ModelParallelStrategy (module built on the meta device in configure_model): the
    same candidate wins as in a 1-rank run, the scores agree to float32 reduction order, and the fit
    starts from the chosen merge, equal to merge_models of it."""
    import json

    from sharded_fit_script import CANDIDATES

    for w in (1, world):
        _script("search", zoo, tmp_path, w)
    one, many = (json.loads((tmp_path / f"search{w}.json").read_text()) for w in (1, world))
    assert many["best_index"] == one["best_index"]
    assert many["scores"] == pytest.approx(one["scores"], rel=1e-5)  # the loss mean, reduced over ranks
    assert len(set(one["scores"])) == len(CANDIDATES)  # the candidates really differ
    best = dict(CANDIDATES[one["best_index"]])
    want = merge_models(zoo["base"], [zoo["e0"], zoo["e1"]], get_method(best.pop("method"), **best), seed=3)
    got = load_file(str(tmp_path / f"search{world}_train_start.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs for an NCCL process group (this machine has none); the same route "
                    "runs on CPU with gloo above")
def test_every_method_into_cuda_shards_with_nccl_equals_one_process(zoo, tmp_path):
    mp.spawn(parity_worker, args=(2, free_port(), zoo, METHODS, str(tmp_path), "cuda"), nprocs=2, join=True)
    for name in METHODS:
        experts = experts_for(name, [zoo["e0"], zoo["e1"]])
        want = merge_models(zoo["base"], experts, get_method(name), seed=7, device="cuda")
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)


def test_row_reads_equal_slices_of_whole_reads(tmp_path):
    """Source.get_rows, the element-wise route's reader: safetensors rows by a positional read of
    their bytes only, and LoRA delta rows as B[rows] @ A, each equal to slicing the whole tensor."""
    from peft import LoraConfig, get_peft_model
    from safety_helpers import TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_merge.sources.resolve import open_source

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(tmp_path / "full")
    peft_model = get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY)), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "lora")
    lora, full = open_source(str(tmp_path / "lora")), open_source(str(tmp_path / "full"))
    for src in (lora, full):
        for key in src.keys()[:6]:
            n = src.shape(key)[0]
            for a, b in ((0, n // 3), (n // 3, n), (n, n)):
                assert torch.equal(src.get_rows(key, a, b), src.get(key)[a:b]), (key, a, b)
    key = "model.layers.0.self_attn.q_proj.weight"
    inner = full._src(key)
    before = inner.bytes_read
    full.get_rows(key, 0, 8)
    assert inner.bytes_read - before == 8 * TINY["hidden_size"] * 4
