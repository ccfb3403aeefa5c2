"""Merging into FSDP2-sharded modules: real gloo process groups and ``fully_shard`` on CPU, 2 and 3
ranks (uneven shards and an empty one). The weights every rank ends with equal a 1-process
``merge_models`` of the same inputs with the same seed, for every registered method."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from sharded_workers import make_zoo, parity_worker

from lightning_merge import get_method, merge_models, method_names

METHODS = [n for n in method_names() if n != "sens_scaled"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return make_zoo(tmp_path_factory.mktemp("sharded_zoo"))


@pytest.mark.parametrize("world", [2, 3])
def test_every_method_into_shards_equals_one_process(zoo, tmp_path, world):
    mp.spawn(parity_worker, args=(world, free_port(), zoo, METHODS, str(tmp_path)), nprocs=world, join=True)
    base = load_file(zoo["base"])
    for name in METHODS:
        experts = [zoo["e0"]] if name == "slerp" else [zoo["e0"], zoo["e1"]]
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
    held = [torch.load(tmp_path / f"nonempty_rank{r}.pt") for r in range(world)]
    if world == 3:  # the 2-row head leaves the last rank an empty shard; 33 rows split unevenly
        assert held[2]["head.weight"] is False and held[0]["head.weight"] is True
