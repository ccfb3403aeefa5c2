"""Which feature axes of a model PLeaS permutes, and how the merged model is rebuilt.

A :class:`PLeaSSpec` lists, for one architecture:

* **groups**: one matching problem each (one permutation of ``units`` units between model A and
  model B). ``partial`` groups may keep some units of both models (merged width between n and
  2n); the others are fully merged (width n). ``match`` names the input *sites* whose features
  are compared, with the number of features per unit at that site (attention heads: a unit is a
  whole key/value head group).
* **axes**: every feature axis a weight reads or writes. ``kind`` is ``"perm"`` (its order follows
  its group's permutation, ``unit`` features per unit), ``"shared"`` (the same features in both
  models: the raw inputs, or outputs over a shared label space: averaged) or ``"separate"``
  (outputs kept side by side: per-task heads over different label spaces).
* **layers**: the linear layers (``nn.Linear``), each with its input site and in/out axes; their
  weights are solved by least squares (:mod:`.solve`).
* **params**: every other tensor, with the axis of each dimension (``None``: not permuted); they
  are combined as the features are (average of matched units, kept where separate).

Supported: ``nn.Sequential`` stacks of ``nn.Linear`` and elementwise activations (one partial
group per hidden layer), and Hugging Face Llama-family models (``LlamaModel``,
``LlamaForCausalLM``, ``LlamaForSequenceClassification``, ...): one permutation for the whole
residual stream (embeddings, every norm, every projection's input or output, fully merged because
RMSNorm normalises over the whole width), one per attention block over whole key/value head
groups (query heads move with their key/value head; fully merged, heads are never split or
widened), and one partial group per MLP (intermediate units of gate/up/down: the merged width
becomes the config's ``intermediate_size``, the same for every layer).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

AxisKind = Literal["perm", "shared", "separate"]
Head = Literal["shared", "separate"]

__all__ = ["Axis", "Group", "LayerSpec", "PLeaSSpec", "build_spec"]

#: modules allowed between the linear layers of a plain stack (elementwise, so units can be permuted)
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
               nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class Group:
    name: str
    units: int
    partial: bool
    match: tuple[tuple[str, int], ...]  # (site, features per unit at that site)


@dataclass(frozen=True)
class Axis:
    name: str
    kind: AxisKind
    size: int
    group: str | None = None
    unit: int = 1


@dataclass(frozen=True)
class LayerSpec:
    name: str  # module path of the nn.Linear
    site: str  # the input site (whose features are the layer's inputs)
    in_axis: str
    out_axis: str
    bias: bool


@dataclass
class PLeaSSpec:
    family: str
    groups: dict[str, Group]
    axes: dict[str, Axis]
    layers: list[LayerSpec]
    params: dict[str, tuple[str | None, ...]]
    sites: dict[str, str]  # site -> module path whose forward input is the site's features
    build: Callable[[dict[str, Tensor], dict[str, int]], nn.Module]
    uniform_partial: bool = False  # every partial group must get the same width (one config field)
    info: dict[str, Any] = field(default_factory=dict)


def _sequential(model: nn.Sequential, head: Head) -> PLeaSSpec:
    linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("pleas: the nn.Sequential has no nn.Linear layer to merge")
    for i, m in enumerate(model):
        ok = isinstance(m, (nn.Linear, *ELEMENTWISE)) or (isinstance(m, nn.Flatten) and i < linears[0])
        if not ok:
            raise ConfigError(f"pleas: module {i} of the nn.Sequential is {type(m).__name__}; PLeaS supports "
                              "stacks of nn.Linear and elementwise activations (ReLU, GELU, Tanh, ..., Dropout), "
                              "with nn.Flatten only before the first Linear")
    groups: dict[str, Group] = {}
    axes: dict[str, Axis] = {"input": Axis("input", "shared", model[linears[0]].in_features)}
    layers: list[LayerSpec] = []
    sites: dict[str, str] = {}
    prev = "input"
    for k, i in enumerate(linears):
        lin = model[i]
        site = f"in{i}"
        sites[site] = str(i)
        if k + 1 < len(linears):
            name = f"hidden{i}"
            groups[name] = Group(name, lin.out_features, True, ((f"in{linears[k + 1]}", 1),))
            axes[name] = Axis(name, "perm", lin.out_features, group=name)
            out = name
        else:
            out = "output"
            axes[out] = Axis(out, head, lin.out_features)
        layers.append(LayerSpec(str(i), site, prev, out, lin.bias is not None))
        prev = out

    def build(state: dict[str, Tensor], widths: dict[str, int]) -> nn.Module:
        mods: list[nn.Module] = []
        for i, m in enumerate(model):
            if isinstance(m, nn.Linear):
                w = state[f"{i}.weight"]
                new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, dtype=m.weight.dtype,
                                device=m.weight.device)
                mods.append(new)
            else:
                mods.append(copy.deepcopy(m))
        out = nn.Sequential(*mods)
        out.load_state_dict({k: v.to(m.weight.dtype) for k, v in state.items()}, strict=True)
        return out

    return PLeaSSpec("sequential", groups, axes, layers, {}, sites, build, info={"head": head})


def _llama_core(model: nn.Module) -> tuple[str, nn.Module]:
    for name, mod in model.named_modules():
        if hasattr(mod, "embed_tokens") and hasattr(mod, "layers") and hasattr(mod, "norm"):
            return name, mod
    raise ConfigError(f"pleas: {type(model).__name__} has no Llama-style core (embed_tokens, layers, norm)")


def _llama(model: nn.Module, head: Head) -> PLeaSSpec:
    cfg = model.config
    prefix, core = _llama_core(model)
    p = f"{prefix}." if prefix else ""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    rep = n_heads // n_kv
    res_sites: list[tuple[str, int]] = []
    groups: dict[str, Group] = {}
    axes: dict[str, Axis] = {"res": Axis("res", "perm", hidden, group="res")}
    layers: list[LayerSpec] = []
    params: dict[str, tuple[str | None, ...]] = {f"{p}embed_tokens.weight": (None, "res"), f"{p}norm.weight": ("res",)}
    sites: dict[str, str] = {}
    for i, blk in enumerate(core.layers):
        b = f"{p}layers.{i}"
        at, mlp = f"{b}.self_attn", f"{b}.mlp"
        for s, path in ((f"attn{i}", f"{at}.q_proj"), (f"o{i}", f"{at}.o_proj"), (f"mlp{i}", f"{mlp}.gate_proj"),
                        (f"down{i}", f"{mlp}.down_proj")):
            sites[s] = path
        res_sites += [(f"attn{i}", 1), (f"mlp{i}", 1)]
        hg, q, kv, mid = f"heads{i}", f"q{i}", f"kv{i}", f"inter{i}"
        groups[hg] = Group(hg, n_kv, False, ((f"o{i}", rep * head_dim),))
        groups[mid] = Group(mid, inter, True, ((f"down{i}", 1),))
        axes[q] = Axis(q, "perm", n_heads * head_dim, group=hg, unit=rep * head_dim)
        axes[kv] = Axis(kv, "perm", n_kv * head_dim, group=hg, unit=head_dim)
        axes[mid] = Axis(mid, "perm", inter, group=mid)
        sa, ml = blk.self_attn, blk.mlp
        layers += [LayerSpec(f"{at}.q_proj", f"attn{i}", "res", q, sa.q_proj.bias is not None),
                   LayerSpec(f"{at}.k_proj", f"attn{i}", "res", kv, sa.k_proj.bias is not None),
                   LayerSpec(f"{at}.v_proj", f"attn{i}", "res", kv, sa.v_proj.bias is not None),
                   LayerSpec(f"{at}.o_proj", f"o{i}", q, "res", sa.o_proj.bias is not None),
                   LayerSpec(f"{mlp}.gate_proj", f"mlp{i}", "res", mid, ml.gate_proj.bias is not None),
                   LayerSpec(f"{mlp}.up_proj", f"mlp{i}", "res", mid, ml.up_proj.bias is not None),
                   LayerSpec(f"{mlp}.down_proj", f"down{i}", mid, "res", ml.down_proj.bias is not None)]
        params[f"{b}.input_layernorm.weight"] = ("res",)
        params[f"{b}.post_attention_layernorm.weight"] = ("res",)
    emb = core.embed_tokens.weight
    for hname in ("lm_head", "score"):
        mod = getattr(model, hname, None)
        if not isinstance(mod, nn.Linear):
            continue
        if mod.weight is emb:  # tied to the embeddings: combined with them, no least squares
            continue
        sites["final"] = hname
        res_sites.append(("final", 1))
        axes["output"] = Axis("output", head, mod.out_features)
        layers.append(LayerSpec(hname, "final", "res", "output", mod.bias is not None))
    known = set(params) | {f"{ly.name}.weight" for ly in layers} | {f"{ly.name}.bias" for ly in layers if ly.bias}
    extra = [n for n, _ in model.named_parameters() if n not in known]
    if extra:
        raise ConfigError(f"pleas: {type(model).__name__} has tensors PLeaS does not know how to permute: {extra[:5]}; "
                          "supported are the Llama-family blocks (q/k/v/o, gate/up/down, norms, embeddings, "
                          "lm_head/score)")
    groups["res"] = Group("res", hidden, False, tuple(res_sites))

    def build(state: dict[str, Tensor], widths: dict[str, int]) -> nn.Module:
        mids = {widths[f"inter{i}"] for i in range(len(core.layers))}
        if len(mids) != 1:
            raise ConfigError(f"pleas: the MLP widths {sorted(mids)} differ between layers; a Llama config has one "
                              "intermediate_size (use one width for every layer)")
        new_cfg = copy.deepcopy(cfg)
        new_cfg.intermediate_size = mids.pop()
        if "output" in widths and head == "separate":
            new_cfg.num_labels = widths["output"]
        dtype = emb.dtype
        out = type(model)(new_cfg).to(dtype)
        missing, unexpected = out.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
        bad = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
        if bad or unexpected:
            raise ConfigError(f"pleas: the merged tensors do not fit {type(model).__name__}: missing {bad[:5]}, "
                              f"unexpected {unexpected[:5]}")
        return out.to(emb.device)

    info = {"head": head, "hidden_size": hidden, "intermediate_size": inter, "heads": n_heads, "kv_heads": n_kv}
    return PLeaSSpec("llama", groups, axes, layers, params, sites, build, uniform_partial=True, info=info)


def _is_llama(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and getattr(cfg, "model_type", None) in ("llama", "mistral", "qwen2") and \
        hasattr(cfg, "intermediate_size")


def build_spec(model: nn.Module, head: Head = "shared") -> PLeaSSpec:
    """The :class:`PLeaSSpec` of ``model`` (module doc for what is supported)."""
    if head not in ("shared", "separate"):
        raise ConfigError(f"pleas: head {head!r} is not 'shared' (one label space: outputs averaged) or 'separate' "
                          "(per-task heads side by side)")
    if isinstance(model, nn.Sequential):
        return _sequential(model, head)
    if _is_llama(model):
        return _llama(model, head)
    raise ConfigError(f"pleas: {type(model).__name__} is not a supported architecture; PLeaS merges nn.Sequential "
                      "stacks of nn.Linear + elementwise activations, and Hugging Face Llama-family models")


def check_same_architecture(spec_a: PLeaSSpec, model_a: nn.Module, model_b: nn.Module) -> None:
    """Both models must have the same tensors with the same shapes (the PLeaS setting: one architecture,
    possibly different bases)."""
    if type(model_a) is not type(model_b):
        raise ConfigError(f"pleas: the models' architectures do not match: {type(model_a).__name__} vs "
                          f"{type(model_b).__name__}")
    sa = {n: tuple(t.shape) for n, t in model_a.state_dict().items()}
    sb = {n: tuple(t.shape) for n, t in model_b.state_dict().items()}
    if sa.keys() != sb.keys():
        diff = sorted(set(sa) ^ set(sb))
        raise ConfigError(f"pleas: the models' architectures do not match: tensors {diff[:5]} are in only one of them")
    bad = [f"{n}: {sa[n]} vs {sb[n]}" for n in sa if sa[n] != sb[n]]
    if bad:
        raise ConfigError(f"pleas: the models' architectures do not match: shapes differ for {bad[:5]}")
    if spec_a.family == "llama":
        ca, cb = model_a.config.to_dict(), model_b.config.to_dict()
        keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "num_hidden_layers", "vocab_size", "hidden_act")
        bad = [f"{k}: {ca.get(k)} vs {cb.get(k)}" for k in keys if ca.get(k) != cb.get(k)]
        if bad:
            raise ConfigError(f"pleas: the models' configs do not match: {bad}")


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
