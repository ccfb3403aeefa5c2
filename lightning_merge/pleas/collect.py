"""The calibration pass of PLeaS: joint feature moments of the two models on the same inputs.

Both models run on every calibration batch. Forward pre-hooks on each *site* (the linear layer
whose input a group of layers reads: ``q_proj`` for q/k/v, ``gate_proj`` for gate/up, ...) take
that input in model A (a) and in model B (b), flattened to rows (tokens; rows where
``attention_mask`` is 0 are left out), and add Σ u uᵀ with u = [a; b; 1] (float64) and the row
count. These sums are all the method needs: the matching costs (E[a aᵀ], E[b bᵀ], E[a bᵀ]), and
each layer's least squares (the layer is linear, so its outputs' moments follow from its inputs'
and its weights, :mod:`.solve`).

Batches: the first ``max_batches`` of the loader; under DDP rank r of w takes batches r, r + w, ...
and the sums and counts are all-reduced (:meth:`FeatureStats.all_reduce`), so every rank holds the
statistics of one process over the same batches (up to float64 summation order).

Data-free variant (PLeaS-free): the same pass on data that are not from the fine-tuning domains,
either a loader of other ("public") data, or :func:`generic_batches`: random inputs shaped like the
models' (uniform random tokens for language models, standard normal features for plain stacks).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .spec import PLeaSSpec

log = logging.getLogger(__name__)

__all__ = ["FeatureStats", "call_model", "collect_features", "generic_batches"]

FORMAT = "lightning_merge.pleas_features/1"


@dataclass
class FeatureStats:
    """Σ u uᵀ (u = [a; b; 1], float64) and the row count of every site."""

    sums: dict[str, Tensor]
    counts: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def moment(self, site: str) -> Tensor:
        n = self.counts[site]
        if n <= 0:
            raise ConfigError(f"pleas: no calibration rows reached site '{site}'; give more calibration batches")
        return self.sums[site] / n

    def all_reduce(self, device: torch.device | None = None) -> FeatureStats:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        dev = device or torch.device("cpu")
        for site in sorted(self.sums):
            t = self.sums[site].to(dev)
            dist.all_reduce(t)
            self.sums[site] = t.cpu()
        sites = sorted(self.counts)
        c = torch.tensor([self.counts[s] for s in sites], dtype=torch.float64, device=dev)
        dist.all_reduce(c)
        self.counts = {s: float(v) for s, v in zip(sites, c.cpu().tolist())}
        return self

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from ..targets.atomic import atomic_file

        meta = {"format": FORMAT, "counts": json.dumps(self.counts), "settings": json.dumps(self.settings)}
        tensors = {s: t.contiguous() for s, t in self.sums.items()}
        return atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ConfigError(f"pleas: '{path}' is not a PLeaS feature-statistics file "
                                  f"(format {meta.get('format')})")
            sums = {k: f.get_tensor(k) for k in f.keys()}
        return cls(sums, json.loads(meta["counts"]), json.loads(meta.get("settings", "{}")))


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model`` on a batch: a tensor, ``(inputs, labels)``, or a dict of keyword inputs (``labels`` dropped)."""
    dev = _device_of(model)
    if isinstance(batch, Tensor):
        return model(batch.to(dev))
    if isinstance(batch, (tuple, list)):
        return model(batch[0].to(dev))
    if isinstance(batch, Mapping):
        kw = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items() if k != "labels"}
        return model(**kw)
    raise ConfigError(f"pleas: a calibration batch is a {type(batch).__name__}; give tensors, (inputs, labels) "
                      "pairs or dicts of model inputs")


def _mask_of(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"].bool()
    return None


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def _site_dims(model: nn.Module, spec: PLeaSSpec) -> dict[str, int]:
    return {s: model.get_submodule(path).in_features for s, path in spec.sites.items()}


def collect_features(model_a: nn.Module, model_b: nn.Module, spec: PLeaSSpec, batches: Iterable[Any], *,
                     max_batches: int, device: torch.device | None = None, ignore_padding: bool = True,
                     settings: dict[str, Any] | None = None) -> FeatureStats:
    """The joint feature moments of ``model_a`` and ``model_b`` at every site of ``spec`` (module doc).

    ``device``: where the DDP all-reduce runs (None: CPU, gloo)."""
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ConfigError(f"pleas: calibration_batches must be a positive integer, got {max_batches!r}")
    dims = _site_dims(model_a, spec)
    stats = FeatureStats({s: torch.zeros(2 * d + 1, 2 * d + 1, dtype=torch.float64) for s, d in dims.items()},
                         {s: 0.0 for s in dims}, dict(settings or {}, max_batches=max_batches))
    rank, world = _rank_world()
    captured: dict[str, Tensor] = {}
    handles = []
    for model, tag in ((model_a, "a"), (model_b, "b")):
        for site, path in spec.sites.items():
            def pre(module: nn.Module, args: tuple[Any, ...], key: str = f"{tag}:{site}") -> None:
                captured[key] = args[0].detach()

            handles.append(model.get_submodule(path).register_forward_pre_hook(pre))
    modes = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    seen = 0
    try:
        with torch.no_grad():
            for k, batch in enumerate(batches):
                if k >= max_batches:
                    break
                seen += 1
                if k % world != rank:
                    continue
                captured.clear()
                call_model(model_a, batch)
                call_model(model_b, batch)
                mask = _mask_of(batch) if ignore_padding else None
                for site in dims:
                    if f"a:{site}" not in captured or f"b:{site}" not in captured:
                        raise ConfigError(f"pleas: the forward pass did not reach '{spec.sites[site]}'; "
                                          "PLeaS needs every layer to run on the calibration batches")
                    a = _rows(captured[f"a:{site}"], mask).double()
                    b = _rows(captured[f"b:{site}"], mask).double()
                    u = torch.cat([a, b, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
                    stats.sums[site].add_((u.T @ u).cpu())
                    stats.counts[site] += float(a.shape[0])
    finally:
        for h in handles:
            h.remove()
        model_a.train(modes[0])
        model_b.train(modes[1])
    if seen == 0:
        raise ConfigError("pleas: the calibration data yielded no batch; PLeaS needs features (give a non-empty "
                          "dataloader, or data_free=True for generic inputs)")
    return stats.all_reduce(device)


def generic_batches(model: nn.Module, spec: PLeaSSpec, n_batches: int, *, batch_size: int = 16,
                    seq_len: int = 32, seed: int = 0, template: Any = None) -> list[Any]:
    """Random calibration inputs for the data-free variant (none from the fine-tuning domains).

    With ``template`` (one real batch, used for its keys, shapes and dtypes only): integer tensors
    become uniform token ids in [1, vocab) (``attention_mask``: all ones), floating ones standard
    normal; ``labels`` are dropped. Without: token ids [batch_size, seq_len] for language models,
    standard normal [batch_size, in_features] for plain stacks."""
    g = torch.Generator().manual_seed(seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)

    def like(name: str, t: Tensor) -> Tensor:
        if name == "attention_mask":
            return torch.ones_like(t)
        if t.dtype.is_floating_point:
            return torch.randn(t.shape, generator=g).to(t.dtype)
        if vocab is None:
            raise ConfigError("pleas: cannot draw generic token ids without config.vocab_size")
        return torch.randint(1, int(vocab), t.shape, generator=g).to(t.dtype)

    out: list[Any] = []
    for _ in range(n_batches):
        if template is not None:
            if isinstance(template, Tensor):
                out.append(like("x", template))
            elif isinstance(template, (tuple, list)):
                out.append(like("x", template[0]))
            elif isinstance(template, Mapping):
                out.append({k: like(k, v) for k, v in template.items() if isinstance(v, Tensor) and k != "labels"})
            else:
                raise ConfigError(f"pleas: cannot imitate a {type(template).__name__} batch for generic data")
        elif spec.family == "llama":
            ids = torch.randint(1, int(vocab), (batch_size, seq_len), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        else:
            first = model.get_submodule(spec.sites[spec.layers[0].site])
            if not isinstance(model, nn.Sequential) or not isinstance(model[0], nn.Linear):
                raise ConfigError("pleas: generic inputs for this model need a template batch (its input shape)")
            out.append(torch.randn(batch_size, first.in_features, generator=g))
    return out
