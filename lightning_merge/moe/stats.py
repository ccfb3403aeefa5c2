"""Routing statistics of an MoE model, collected with forward hooks on its routers.

For every sparse block (:func:`~lightning_merge.moe.arch.moe_layers`) a forward hook on the router
sees the router logits z [N, E] and the top-k indices [N, k] of each batch's N tokens and adds, in
float64:

* ``counts[e]``: how many times expert e is among a token's top-k (the router's own choice);
* ``tokens``: N (so Σ_e counts[e] = k · tokens);
* ``gram``: Σ_t z_t z_tᵀ [E, E], the Gram matrix of the logit columns.

Activation frequency (the paper's usage frequency) is f_e = counts[e] / Σ_e' counts[e'], the
fraction of top-k assignments that go to e (Σ_e f_e = 1; the authors' ``compute_all_usages``).
Router-logit similarity (the authors' default ``similarity_base="router-logits"``) is
``(cos(Z[:, i], Z[:, j]) + 1) / 2`` with the cosine taken over all calibration tokens; it is
computed exactly from the Gram: cos_ij = G_ij / sqrt(G_ii G_jj), so the logits never need to be
kept and the sums all-reduce. With ``ignore_padding`` the tokens where ``attention_mask`` is 0 are
left out (the authors calibrate on packed text without padding). ``keep_tokens`` > 0 also keeps
the first ``keep_tokens`` router inputs per block and their top-k indices, for activation matching.

Batches: the first ``max_batches`` of the loader(s) (all when None); under DDP rank r of w takes
batches r, r + w, ... and the sums are all-reduced (kept tokens are all-gathered), so the result
equals one process's over the same batches up to float64 summation order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .arch import MoELayer, moe_layers

log = logging.getLogger(__name__)

__all__ = ["RoutingStatistics", "calibration_batches", "collect_routing"]

FORMAT = "lightning_merge.routing/1"


@dataclass
class RoutingStatistics:
    """Per-block routing sums (module doc); ``layers`` are the blocks' module paths."""

    layers: list[str]
    num_experts: int
    top_k: int
    counts: dict[str, Tensor] = field(default_factory=dict)
    gram: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    kept: dict[str, Tensor] = field(default_factory=dict)
    kept_index: dict[str, Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, layers: list[MoELayer], **settings: Any) -> RoutingStatistics:
        e = layers[0].num_experts
        s = cls([x.name for x in layers], e, layers[0].top_k, settings=dict(settings))
        for x in layers:
            s.counts[x.name] = torch.zeros(e, dtype=torch.float64)
            s.gram[x.name] = torch.zeros(e, e, dtype=torch.float64)
            s.tokens[x.name] = 0.0
        return s

    def frequency(self, layer: str) -> Tensor:
        """f_e = counts[e] / Σ counts: the fraction of top-k assignments routed to each expert."""
        c = self.counts[layer]
        total = float(c.sum())
        if total <= 0:
            raise ConfigError(f"routing statistics of '{layer}' hold no token; the calibration data was empty "
                              "(pass a dataloader with batches, or raise max_batches)")
        return c / total

    def similarity(self, layer: str) -> Tensor:
        """(cos + 1) / 2 between router-logit columns over the calibration tokens [E, E] (diagonal 1)."""
        g = self.gram[layer]
        d = torch.sqrt(torch.clamp(torch.diagonal(g), min=1e-300))
        s = (g / (d[:, None] * d[None, :]) + 1) / 2
        s.fill_diagonal_(1.0)
        return s

    def add(self, layer: str, logits: Tensor, index: Tensor, keep: Tensor | None, limit: int) -> None:
        z = logits.detach().double().cpu()
        self.gram[layer] += z.T @ z
        self.counts[layer] += torch.bincount(index.reshape(-1).cpu(), minlength=self.num_experts).double()
        self.tokens[layer] += float(z.shape[0])
        if keep is not None and limit > 0:
            have = self.kept[layer].shape[0] if layer in self.kept else 0
            take = max(0, min(limit - have, keep.shape[0]))
            if take:
                x, i = keep[:take].detach().float().cpu(), index[:take].detach().cpu().long()
                self.kept[layer] = torch.cat([self.kept[layer], x]) if have else x
                self.kept_index[layer] = torch.cat([self.kept_index[layer], i]) if have else i

    # ---- DDP
    def all_reduce(self, device: torch.device | None = None) -> RoutingStatistics:
        """Sum counts, Grams and token counts over the ranks (in place); gather the kept tokens."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        dev = device or torch.device("cpu")
        for name in self.layers:
            for box in (self.counts, self.gram):
                t = box[name].to(dev)
                dist.all_reduce(t)
                box[name] = t.cpu()
        t = torch.tensor([self.tokens[n] for n in self.layers], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        self.tokens = dict(zip(self.layers, t.cpu().tolist()))
        limit = int(self.settings.get("keep_tokens", 0))
        if limit:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.kept, self.kept_index))
            for name in self.layers:
                xs = [p[0][name] for p in parts if name in p[0]]
                ix = [p[1][name] for p in parts if name in p[1]]
                if xs:
                    self.kept[name], self.kept_index[name] = torch.cat(xs)[:limit], torch.cat(ix)[:limit]
        return self

    # ---- files
    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file (atomic): ``counts/<layer>``, ``gram/<layer>``, ... plus JSON metadata."""
        from safetensors.torch import save_file

        from ..targets.atomic import atomic_file

        tensors = {f"{k}/{n}": t.contiguous() for k, box in (("counts", self.counts), ("gram", self.gram),
                                                             ("kept", self.kept), ("kept_index", self.kept_index))
                   for n, t in box.items()}
        meta = {"format": FORMAT, "layers": self.layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "tokens": self.tokens, "settings": self.settings}
        header = {"lightning_merge": json.dumps(meta)}
        return atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingStatistics:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("lightning_merge", "null"))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise ValueError("no routing statistics metadata")
                s = cls(list(meta["layers"]), int(meta["num_experts"]), int(meta["top_k"]),
                        tokens={k: float(v) for k, v in meta["tokens"].items()}, settings=dict(meta["settings"]))
                for key in f.keys():
                    kind, name = key.split("/", 1)
                    getattr(s, kind)[name] = f.get_tensor(key)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise ConfigError(f"'{path}' is not a routing statistics file ({type(e).__name__}: {e}); write one "
                              "with RoutingStatistics.save or MoEMergeCallback(statistics_out=...)") from None
        return s

    def check_model(self, layers: list[MoELayer], where: str = "statistics") -> None:
        names = [x.name for x in layers]
        if names != self.layers or layers[0].num_experts != self.num_experts:
            raise ConfigError(f"{where}: the routing statistics are of blocks {self.layers[:2]}... with "
                              f"{self.num_experts} experts, but the model has {names[:2]}... with "
                              f"{layers[0].num_experts}; collect them on this model")


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def calibration_batches(data: Any, max_batches: int | None) -> list[Mapping[str, Any]]:
    """This rank's share of the first ``max_batches`` batches of a loader, a list of loaders or a
    ``{name: loader}`` mapping (taken one after another)."""
    if data is None:
        raise ConfigError("no calibration data: the routing statistics need a dataloader (dataloader=...) or "
                          "saved statistics (statistics=...)")
    loaders: list[Iterable[Any]]
    if isinstance(data, Mapping) and not any(isinstance(v, Tensor) for v in data.values()):
        loaders = list(data.values())
    elif isinstance(data, (list, tuple)) and data and not isinstance(data[0], Mapping):
        loaders = list(data)
    else:
        loaders = [data]
    rank, world = _rank_world()
    out: list[Mapping[str, Any]] = []
    k = 0
    for loader in loaders:
        for batch in loader:
            if max_batches is not None and k >= max_batches:
                break
            if not isinstance(batch, Mapping):
                raise ConfigError(f"calibration batches must be dicts of model inputs (input_ids, attention_mask, "
                                  f"...), got {type(batch).__name__}")
            if k % world == rank:
                out.append(batch)
            k += 1
    if k == 0:
        raise ConfigError("no calibration data: the dataloader yielded no batch")
    return out


class _RouterHooks:
    def __init__(self, layers: list[MoELayer], stats: RoutingStatistics, limit: int) -> None:
        self.stats, self.limit = stats, limit
        self.mask: Tensor | None = None
        self.handles = [x.router.register_forward_hook(self._hook(x)) for x in layers]

    def _hook(self, layer: MoELayer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) == 3 and output[0].ndim == 2):
                raise ConfigError(f"'{layer.name}.gate' returned {type(output).__name__}, not (router_logits, "
                                  "weights, indices); this router is not supported")
            logits, _, index = output
            x = args[0].reshape(-1, args[0].shape[-1])
            if self.mask is not None and self.mask.numel() == logits.shape[0]:
                keep = self.mask.reshape(-1).to(logits.device)
                logits, index, x = logits[keep], index[keep], x[keep]
            self.stats.add(layer.name, logits, index, x if self.limit else None, self.limit)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def collect_routing(model: nn.Module, data: Any, *, max_batches: int | None = None, ignore_padding: bool = True,
                    keep_tokens: int = 0, forward: Any = None,
                    device: torch.device | None = None) -> RoutingStatistics:
    """Routing statistics of ``model`` over calibration batches (module doc).

    ``forward(batch)`` runs the model on a batch (default: ``model(**batch)`` without ``labels``,
    tensors moved to the model's device); ``device``: where NCCL all-reduces (None: CPU, gloo)."""
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1 or None, got {max_batches}")
    layers = moe_layers(model)
    stats = RoutingStatistics.empty(layers, max_batches=max_batches, ignore_padding=ignore_padding,
                                    keep_tokens=int(keep_tokens))
    batches = calibration_batches(data, max_batches)
    dev = next(model.parameters()).device

    def default(batch: Mapping[str, Any]) -> Any:
        inputs = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items() if k != "labels"}
        return model(**inputs)

    run = forward or default
    hooks = _RouterHooks(layers, stats, int(keep_tokens))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                m = batch.get("attention_mask") if ignore_padding else None
                hooks.mask = m.bool() if isinstance(m, Tensor) else None
                run(batch)
    finally:
        hooks.close()
        model.train(was)
    stats.all_reduce(device)
    log.info("routing statistics: %d blocks, %.0f tokens per block", len(layers), stats.tokens[layers[0].name])
    return stats
