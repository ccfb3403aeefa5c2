"""Worker processes of the sharded-merging tests (module level, so ``torch.multiprocessing.spawn``
can import them): real gloo process groups, real ``fully_shard`` (FSDP2) on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

N_VOCAB, HIDDEN, FFN = 50, 16, 33


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(HIDDEN, HIDDEN), "v_proj": nn.Linear(HIDDEN, HIDDEN)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(HIDDEN, FFN), "down_proj": nn.Linear(FFN, HIDDEN)})
        self.input_layernorm = nn.LayerNorm(HIDDEN)

    def forward(self, x):
        x = x + self.self_attn["v_proj"](self.self_attn["q_proj"](self.input_layernorm(x)))
        return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](x)))


class Net(nn.Module):
    """Uneven shards on 3 ranks (33 rows, 50 rows) and an empty one (the 2-row head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(N_VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for b in self.layers:
            x = b(x)
        return self.head(x.mean(1))


def make_zoo(root: Path, n_experts: int = 2) -> dict[str, str]:
    """base.safetensors and e<i>.safetensors: the base and base + seeded noise of different scales."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in Net().state_dict().items()}
    save_file(base, str(root / "base.safetensors"))
    out = {"base": str(root / "base.safetensors")}
    gen = torch.Generator().manual_seed(1)
    for i in range(n_experts):
        save_file({k: v + (0.01 * (i + 1)) * torch.randn(v.shape, generator=gen) for k, v in base.items()},
                  str(root / f"e{i}.safetensors"))
        out[f"e{i}"] = str(root / f"e{i}.safetensors")
    return out


def _init(rank: int, world: int, port: int, device: str = "cpu") -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)


def sharded_net(world: int, device: str = "cpu") -> Net:
    """The base network, sharded with FSDP2 over all ranks (each block, then the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Net().to(device if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    mesh = init_device_mesh(device, (world,))
    for block in net.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def full_state(net: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict on rank 0 (a collective)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in sd.items()} if dist.get_rank() == 0 else None


def experts_for(name: str, experts: list[str]) -> list[str]:
    """Two experts, or as many as the method takes (its contract: slerp and passthrough one)."""
    from lightning_merge.methods import method_class

    c = method_class(name).contract
    return experts[:max(c.min_experts, min(len(experts), c.max_experts or len(experts)))]


def parity_worker(rank: int, world: int, port: int, zoo: dict[str, str], methods: list[str], out: str,
                  device: str = "cpu") -> None:
    """Merge every method into the sharded network (base: the module itself, and once a file);
    rank 0 saves each merged full state, the restored one, and every rank's shard sizes."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from lightning_merge import get_method, merge_models
    from lightning_merge.lightning.sharded import local_box

    _init(rank, world, port, device)
    try:
        net = sharded_net(world, device)
        experts = [zoo["e0"], zoo["e1"]]
        sizes = {n: local_box(p, rank, world) is not None for n, p in net.named_parameters()}
        for name in methods:
            use = experts_for(name, experts)
            merge_models(None, use, get_method(name), out=net, seed=7, device=device)
            sd = full_state(net)
            if rank == 0:
                save_file(sd, f"{out}/{name}.safetensors")
            net._lightning_merge_backup.restore()
        merge_models(zoo["base"], experts, get_method("ties"), out=net, seed=7, device=device)  # base: a file
        sd = full_state(net)
        net._lightning_merge_backup.restore()
        restored = full_state(net)
        if rank == 0:
            save_file(sd, f"{out}/ties_base_file.safetensors")
            save_file(restored, f"{out}/restored.safetensors")
        torch.save(sizes, f"{out}/nonempty_rank{rank}.pt")
        # the element-wise route: each rank reads only its own rows of every expert
        from lightning_merge.sources.files import SafetensorsFileSource

        srcs = [SafetensorsFileSource(e) for e in experts]
        merge_models(None, srcs, get_method("task_arithmetic"), out=net, seed=7, device=device)
        net._lightning_merge_backup.restore()
        torch.save([s.bytes_read for s in srcs], f"{out}/bytes_read_rank{rank}.pt")
    finally:
        dist.destroy_process_group()
