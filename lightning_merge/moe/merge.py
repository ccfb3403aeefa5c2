"""M-SMoE: merge each block's experts into ``num_experts`` by routing statistics.

Per block (:func:`~lightning_merge.moe.arch.moe_layers`), with activation frequencies f and
similarities from :class:`~lightning_merge.moe.stats.RoutingStatistics`:

1. groups around the G most used (dominant) experts (:func:`~lightning_merge.moe.grouping.group_experts`);
2. every member is permuted to its group's dominant expert (:mod:`~lightning_merge.moe.align`);
3. each group becomes one expert, W_g = Σ_{e∈g} f_e W_e / Σ_{e∈g} f_e for the gate, up and down
   weights (``weighting="frequency"``, the authors' ``_merge_mlp_experts_by_usage_frequency_weighting``;
   they add ε = 1.19e-7 to the denominator, which only matters when Σ f = 0: then this code takes the
   plain mean); ``"uniform"``: the plain mean (the naive-averaging baseline).

The router, ``layout``:

* ``"compact"`` (default): the block keeps G experts, and merged expert g keeps the router row of
  its dominant expert (the members' rows are dropped), so a token is routed among the dominant
  experts' logits only; ``top_k`` is clipped to G (or set). The config's expert count
  (``num_local_experts`` / ``num_experts``) and ``num_experts_per_tok`` are updated, so the model
  saves and loads as a smaller MoE of the same class.
* ``"tied"``: the authors' own form: all E router rows stay and every member's slot holds its
  group's merged expert (they bind ``experts[e] = experts[dominant]``), so routing is unchanged;
  the saved model keeps E expert slots (G distinct), i.e. no memory saving on disk.

:func:`drop_experts` is the pruning baseline: keep the G most used experts of every block and their
router rows (compact layout). Blocks outside the routed experts (a Qwen2-MoE ``shared_expert``,
attention, norms, embeddings) are not touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .align import align_to
from .arch import Expert, MoELayer, moe_layers, read_experts, resize_layer, set_config_experts, write_experts
from .grouping import Groups, group_experts, row_similarity, weight_similarity
from .stats import RoutingStatistics, collect_routing

log = logging.getLogger(__name__)

__all__ = ["LayerPlan", "MoEMerge", "drop_experts", "msmoe_merge", "save_moe"]

Align = Literal["weight", "activation", "none"]
Weighting = Literal["frequency", "uniform"]
Similarity = Literal["router-logits", "router-weight", "weight"]
Layout = Literal["compact", "tied"]
REPORT = "moe_merge.json"
KEEP_TOKENS = 2048


@dataclass
class LayerPlan:
    """What happened to one block: groups (original expert indices, dominant first) and weights."""

    layer: str
    frequency: list[float]
    dominant: list[int]
    labels: list[int]
    members: list[list[int]]
    weights: list[list[float]]
    permutations: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class MoEMerge:
    """The merged model (the input module, changed in place) and what was done to it."""

    model: nn.Module
    plans: list[LayerPlan]
    statistics: RoutingStatistics
    settings: dict[str, Any]
    config_updates: dict[str, int]
    path: Path | None = None

    def report(self) -> dict[str, Any]:
        plans = [{k: v for k, v in asdict(p).items() if k != "permutations"} for p in self.plans]
        return {"settings": self.settings, "config_updates": self.config_updates, "layers": plans}


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {list(allowed)}")


def _top_k(layers: list[MoELayer], g: int, top_k: int | None, layout: str) -> int:
    k = layers[0].top_k
    if layout == "tied":
        if top_k is not None and top_k != k:
            raise ConfigError(f"top_k={top_k}: layout='tied' keeps the router and its top-k ({k}); "
                              "use layout='compact'")
        return k
    if top_k is None:
        if k > g:
            log.info("top-k %d clipped to the %d experts left", k, g)
        return min(k, g)
    if not 1 <= top_k <= g:
        raise ConfigError(f"top_k={top_k} is out of range: it must be between 1 and num_experts={g}")
    return top_k


def _statistics(model: nn.Module, layers: list[MoELayer], dataloader: Any, statistics: Any,
                max_batches: int | None, ignore_padding: bool, keep_tokens: int) -> RoutingStatistics:
    if statistics is not None:
        stats = statistics if isinstance(statistics, RoutingStatistics) else RoutingStatistics.load(statistics)
        stats.check_model(layers)
        return stats
    if dataloader is None:
        raise ConfigError("no calibration data: pass dataloader=... (batches of model inputs) or statistics=... "
                          "(a RoutingStatistics or its file); the merge needs the routing statistics")
    return collect_routing(model, dataloader, max_batches=max_batches, ignore_padding=ignore_padding,
                           keep_tokens=keep_tokens)


def _check_count(layers: list[MoELayer], num_experts: int) -> None:
    e = layers[0].num_experts
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= e:
        raise ConfigError(f"num_experts={num_experts!r} is out of range: the model has {e} experts per block; "
                          f"pass an integer between 1 and {e}")


def _similarity(kind: str, stats: RoutingStatistics, layer: MoELayer, experts: list[Expert]) -> Tensor:
    if kind == "router-logits":
        return stats.similarity(layer.name)
    if kind == "router-weight":
        return row_similarity(layer.router.weight.float())
    return weight_similarity(experts)


def _tokens_for(stats: RoutingStatistics, layer: str, experts: tuple[int, int]) -> Tensor | None:
    x, ix = stats.kept.get(layer), stats.kept_index.get(layer)
    if x is None or ix is None:
        return None
    sel = (ix == experts[0]).any(1) | (ix == experts[1]).any(1)
    return x[sel]


def _merge_group(layer: MoELayer, experts: list[Expert], members: list[int], freq: Tensor, weighting: str,
                 align: str, stats: RoutingStatistics) -> tuple[Expert, list[float], dict[int, list[int]]]:
    d = members[0]
    f = torch.tensor([float(freq[e]) for e in members], dtype=torch.float64)
    if weighting == "uniform" or float(f.sum()) <= 0:
        w = torch.full((len(members),), 1.0 / len(members), dtype=torch.float64)
    else:
        w = f / f.sum()
    aligned, perms = [experts[d]], {}
    for m in members[1:]:
        tokens = _tokens_for(stats, layer.name, (d, m)) if align == "activation" else None
        if align == "activation" and tokens is None:
            raise ConfigError("align='activation' needs kept calibration tokens (collect the statistics with "
                              f"keep_tokens > 0, e.g. {KEEP_TOKENS})")
        e, perm = align_to(experts[d], experts[m], align, tokens, getattr(layer.experts, "act_fn", None))
        aligned.append(e)
        if align != "none":
            perms[m] = perm.tolist()
    out = {k: sum(float(wi) * x.matrices()[k].double() for wi, x in zip(w, aligned)).float()
           for k in ("gate", "up", "down")}
    return Expert(**out), w.tolist(), perms


def _finish(model: nn.Module, before: tuple[int, int], g: int, top_k: int, layout: str) -> dict[str, int]:
    """Config updates; ``before``: the (expert count, top-k) before the merge."""
    if layout == "tied" or (g, top_k) == before:
        return {}
    config = getattr(model, "config", None)
    return set_config_experts(config, g, top_k) if config is not None else {}


def msmoe_merge(model: nn.Module, dataloader: Any = None, *, num_experts: int, statistics: Any = None,
                top_k: int | None = None, align: Align = "weight", weighting: Weighting = "frequency",
                similarity: Similarity = "router-logits", layout: Layout = "compact",
                max_batches: int | None = None, ignore_padding: bool = True, out_dir: str | Path | None = None,
                overwrite: bool = False) -> MoEMerge:
    """M-SMoE (module doc): merge every block of ``model`` (in place) to ``num_experts`` experts.

    Args:
        dataloader: calibration batches (dicts of model inputs; a loader, a list or a dict of
            loaders); not needed with ``statistics``.
        statistics: a :class:`RoutingStatistics` (or its file) instead of collecting.
        top_k: the merged router's top-k (``compact``; default: the model's, clipped to num_experts).
        align: neuron alignment of members to their dominant expert: weight / activation / none.
        weighting: ``frequency`` (M-SMoE) or ``uniform`` (naive averaging of each group).
        similarity: how members choose their group: router-logits / router-weight / weight.
        layout: ``compact`` (G experts, dominant router rows) or ``tied`` (the authors' E slots).
        max_batches, ignore_padding: of the calibration pass (:func:`collect_routing`).
        out_dir: also write the merged model as a Hugging Face folder there (atomic).
    """
    _check_choice("align", align, ("weight", "activation", "none"))
    _check_choice("weighting", weighting, ("frequency", "uniform"))
    _check_choice("similarity", similarity, ("router-logits", "router-weight", "weight"))
    _check_choice("layout", layout, ("compact", "tied"))
    layers = moe_layers(model)
    _check_count(layers, num_experts)
    k = _top_k(layers, num_experts, top_k, layout)
    _check_out(out_dir, overwrite)
    before = (layers[0].num_experts, layers[0].top_k)
    stats = _statistics(model, layers, dataloader, statistics, max_batches, ignore_padding,
                        KEEP_TOKENS if align == "activation" else 0)
    plans: list[LayerPlan] = []
    for layer in layers:
        freq = stats.frequency(layer.name)
        experts = read_experts(layer)
        groups = group_experts(freq, _similarity(similarity, stats, layer, experts), num_experts)
        merged, members, weights, perms = [], [], [], {}
        for g in range(num_experts):
            mem = groups.members(g)
            e, w, p = _merge_group(layer, experts, mem, freq, weighting, align, stats)
            merged.append(e)
            members.append(mem)
            weights.append(w)
            perms.update(p)
        _apply(layer, groups, merged, layout, k)
        plans.append(LayerPlan(layer.name, freq.tolist(), groups.dominant, groups.labels, members, weights, perms))
        log.info("%s: groups %s (dominant %s)", layer.name, members, groups.dominant)
    updates = _finish(model, before, num_experts, k, layout)
    settings = {"method": "msmoe", "num_experts": num_experts, "top_k": k, "align": align, "weighting": weighting,
                "similarity": similarity, "layout": layout}
    result = MoEMerge(model, plans, stats, settings, updates)
    if out_dir is not None:
        result.path = save_moe(model, out_dir, overwrite=overwrite, report=result.report())
    return result


def _apply(layer: MoELayer, groups: Groups, merged: list[Expert], layout: str, top_k: int) -> None:
    if layout == "tied":
        write_experts(layer, [merged[lab] for lab in groups.labels])
        return
    rows = layer.router.weight.detach()[torch.tensor(groups.dominant)]
    resize_layer(layer, merged, rows, top_k)


def drop_experts(model: nn.Module, dataloader: Any = None, *, num_experts: int, statistics: Any = None,
                 top_k: int | None = None, max_batches: int | None = None, ignore_padding: bool = True,
                 out_dir: str | Path | None = None, overwrite: bool = False) -> MoEMerge:
    """Baseline: keep the ``num_experts`` most used experts of every block and their router rows."""
    layers = moe_layers(model)
    _check_count(layers, num_experts)
    k = _top_k(layers, num_experts, top_k, "compact")
    _check_out(out_dir, overwrite)
    before = (layers[0].num_experts, layers[0].top_k)
    stats = _statistics(model, layers, dataloader, statistics, max_batches, ignore_padding, 0)
    plans = []
    for layer in layers:
        freq = stats.frequency(layer.name)
        keep = sorted(torch.argsort(freq, descending=True, stable=True)[:num_experts].tolist())
        experts = read_experts(layer)
        labels = [keep.index(e) if e in keep else -1 for e in range(len(experts))]
        _apply(layer, Groups(keep, labels), [experts[e] for e in keep], "compact", k)
        plans.append(LayerPlan(layer.name, freq.tolist(), keep, labels, [[e] for e in keep], [[1.0]] * len(keep)))
    updates = _finish(model, before, num_experts, k, "compact")
    result = MoEMerge(model, plans, stats, {"method": "drop", "num_experts": num_experts, "top_k": k}, updates)
    if out_dir is not None:
        result.path = save_moe(model, out_dir, overwrite=overwrite, report=result.report())
    return result


def _check_out(out_dir: str | Path | None, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` before anything is merged (the model changes in place)."""
    if out_dir is not None:
        from ..targets.atomic import check_output_dir

        check_output_dir(Path(out_dir), overwrite)


def save_moe(model: nn.Module, out_dir: str | Path, *, overwrite: bool = False, report: dict[str, Any] | None = None,
             extra: dict[str, Callable[[Path], object]] | None = None) -> Path:
    """Write ``model`` (a transformers model) with ``save_pretrained`` into ``out_dir`` atomically,
    with ``moe_merge.json`` (the report) and every ``extra[name](path)`` file beside it."""
    from ..targets.atomic import atomic_output_dir, check_output_dir

    if not callable(getattr(model, "save_pretrained", None)):
        raise ConfigError(f"out_dir: {type(model).__name__} has no save_pretrained; pass a transformers model "
                          "or leave out_dir unset and save the module yourself")
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        for name, write in (extra or {}).items():
            write(tmp / name)
    log.info("merged MoE written to %s", out)
    return out
