"""Where a Hugging Face mixture-of-experts model keeps its experts and routers (transformers 5).

transformers 5 stores the experts of a sparse block *fused*: the block (``mlp`` in Mixtral,
Qwen2-MoE, Qwen3-MoE, ...) has a router ``gate`` with ``weight`` [E, H] whose forward returns
``(router_logits [N, E], top-k weights [N, k], top-k indices [N, k])``, and an ``experts`` module
with ``gate_up_proj`` [E, 2I, H] (the gate projection's rows first, then the up projection's) and
``down_proj`` [E, H, I]; expert e computes ``down_e · (act(gate_e x) ⊙ up_e x)``. A Qwen2-MoE shared
expert (``shared_expert``, ``shared_expert_gate``) is a plain MLP outside ``experts`` and is left
as it is. :func:`moe_layers` finds every such block; anything else (a per-expert ``ModuleList``, a
transposed, interleaved or biased layout, no gate projection) is refused with a
:class:`~lightning_merge.errors.ConfigError`.

An expert is handled as an :class:`Expert` (``gate`` [I, H], ``up`` [I, H], ``down`` [H, I]);
:func:`read_experts` / :func:`write_experts` move between that view and the fused parameters;
:func:`resize_layer` replaces a block's experts and router rows by a smaller set and updates every
attribute that counts experts (``num_experts``, ``top_k``) on the block, router and experts module.
:func:`set_config_experts` sets the config's expert count (``num_local_experts`` for Mixtral,
``num_experts`` for Qwen) and clips ``num_experts_per_tok`` to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["Expert", "MoELayer", "expert_count_key", "moe_layers", "read_experts", "resize_layer",
           "set_config_experts", "write_experts"]


@dataclass
class Expert:
    """One SwiGLU expert: ``down · (act(gate x) ⊙ up x)``; gate, up [I, H], down [H, I]."""

    gate: Tensor
    up: Tensor
    down: Tensor

    def permuted(self, perm: Tensor) -> Expert:
        """The same function with the intermediate units reordered: unit i of the result is unit perm[i]."""
        return Expert(self.gate[perm], self.up[perm], self.down[:, perm])

    def matrices(self) -> dict[str, Tensor]:
        return {"gate": self.gate, "up": self.up, "down": self.down}

    def __call__(self, x: Tensor, act: nn.Module) -> Tensor:
        return (act(x @ self.gate.T) * (x @ self.up.T)) @ self.down.T


@dataclass
class MoELayer:
    """A sparse block: its module path, the block, its router and its fused experts module."""

    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(getattr(self.router, "top_k", getattr(self.block, "top_k", 1)))

    @property
    def intermediate(self) -> int:
        return int(self.experts.down_proj.shape[-1])


def _check_experts(name: str, experts: nn.Module, router: nn.Module) -> None:
    arch = type(experts).__name__
    for attr, ok in (("is_transposed", False), ("has_bias", False), ("has_gate", True), ("is_concatenated", True),
                     ("has_post_expert_norm", False)):
        if getattr(experts, attr, ok) != ok:
            raise ConfigError(f"'{name}.experts' ({arch}) has {attr}={not ok}; only the untransposed, concatenated, "
                              "bias-free gate/up/down layout (Mixtral, Qwen2-MoE, Qwen3-MoE) is supported")
    gu, dn = experts.gate_up_proj, experts.down_proj
    w = getattr(router, "weight", None)
    if gu.ndim != 3 or dn.ndim != 3 or not isinstance(w, Tensor) or w.ndim != 2:
        raise ConfigError(f"'{name}': expected gate_up_proj [E, 2I, H], down_proj [E, H, I] and a router weight [E, H]")
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(dn.shape) != (e, h, two_i // 2) or tuple(w.shape) != (e, h):
        raise ConfigError(f"'{name}': inconsistent expert shapes gate_up_proj {tuple(gu.shape)}, down_proj "
                          f"{tuple(dn.shape)}, router {tuple(w.shape)}")


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of ``model`` in module order (module doc); raises ConfigError when none."""
    found: list[MoELayer] = []
    legacy: list[str] = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        router = getattr(mod, "gate", None)
        if not isinstance(experts, nn.Module) or not isinstance(router, nn.Module):
            continue
        if isinstance(experts, nn.ModuleList):
            legacy.append(name)
            continue
        if isinstance(getattr(experts, "gate_up_proj", None), Tensor) and isinstance(
                getattr(experts, "down_proj", None), Tensor):
            _check_experts(name, experts, router)
            found.append(MoELayer(name, mod, router, experts))
    if not found:
        what = type(model).__name__
        if legacy:
            raise ConfigError(f"{what}: the MoE blocks {legacy[:3]} keep their experts in a ModuleList; this "
                              "architecture is not supported (supported: transformers 5 fused experts, e.g. Mixtral, "
                              "Qwen2-MoE, Qwen3-MoE)")
        raise ConfigError(f"{what} is not a mixture-of-experts model: no block with a router 'gate' and fused "
                          "'experts' (gate_up_proj, down_proj) was found; pass a Mixtral / Qwen2-MoE / Qwen3-MoE model")
    counts = {layer.num_experts for layer in found}
    if len(counts) > 1:
        raise ConfigError(f"{type(model).__name__}: its MoE blocks have different expert counts {sorted(counts)}; "
                          "only one count per model is supported")
    return found


def read_experts(layer: MoELayer) -> list[Expert]:
    """The block's experts as float32 copies."""
    gu = layer.experts.gate_up_proj.detach().float()
    dn = layer.experts.down_proj.detach().float()
    i = dn.shape[-1]
    return [Expert(gu[e, :i].clone(), gu[e, i:].clone(), dn[e].clone()) for e in range(gu.shape[0])]


def _stack(experts: list[Expert], like: Tensor) -> tuple[Tensor, Tensor]:
    gu = torch.stack([torch.cat([x.gate, x.up], 0) for x in experts]).to(like.dtype).to(like.device)
    dn = torch.stack([x.down for x in experts]).to(like.dtype).to(like.device)
    return gu, dn


def write_experts(layer: MoELayer, experts: list[Expert]) -> None:
    """Overwrite the block's experts in place (same count)."""
    if len(experts) != layer.num_experts:
        raise ValueError(f"{layer.name}: {len(experts)} experts for {layer.num_experts} slots")
    gu, dn = _stack(experts, layer.experts.gate_up_proj)
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(gu)
        layer.experts.down_proj.copy_(dn)


def resize_layer(layer: MoELayer, experts: list[Expert], router_rows: Tensor, top_k: int) -> None:
    """Replace the block's experts by ``experts`` and its router weight by ``router_rows`` [G, H]."""
    g = len(experts)
    old = layer.experts.gate_up_proj
    gu, dn = _stack(experts, old)
    grad = old.requires_grad
    layer.experts.gate_up_proj = nn.Parameter(gu, requires_grad=grad)
    layer.experts.down_proj = nn.Parameter(dn, requires_grad=layer.experts.down_proj.requires_grad)
    w = layer.router.weight
    layer.router.weight = nn.Parameter(router_rows.to(w.dtype).to(w.device).clone(), requires_grad=w.requires_grad)
    for mod in (layer.block, layer.router, layer.experts):
        for attr in ("num_experts", "num_local_experts"):
            if isinstance(getattr(mod, attr, None), int):
                setattr(mod, attr, g)
        for attr in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(mod, attr, None), int):
                setattr(mod, attr, top_k)


def expert_count_key(config: object) -> str:
    """The config field that holds the number of routed experts."""
    fields = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(fields.get(key), int):
            return key
    raise ConfigError(f"{type(config).__name__} has no expert count field (num_local_experts / num_experts)")


def set_config_experts(config: object, num_experts: int, top_k: int) -> dict[str, int]:
    """Set the expert count and ``num_experts_per_tok``; returns the fields set."""
    key = expert_count_key(config)
    setattr(config, key, num_experts)
    out = {key: num_experts}
    if hasattr(config, "num_experts_per_tok"):
        config.num_experts_per_tok = top_k
        out["num_experts_per_tok"] = top_k
    return out
