"""mergekit's layer-range ``slices:``: frankenmerges and per-slice merges, with renumbered layers.

A config whose slices take sub-ranges of layers, or several slices, builds a model layer by layer::

    slices:
      - sources: [{model: A, layer_range: [0, 24]}]
      - sources: [{model: B, layer_range: [8, 32]}]
    merge_method: passthrough

gives a model of 48 layers: A's layers 0-23, then B's layers 8-31 as layers 24-47. A slice with
several sources merges them layer by layer with ``merge_method`` (every source covers the same
number of layers). Exactly as mergekit 0.1.5 plans it (``MergePlanner``):

* output layer ``o + i`` of a slice starting at output layer ``o`` merges, for every source
  ``(model, [a, b])``, that model's layer ``a + i``; the slice's parameters resolve source →
  slice → global, its base is the slice's ``base_model`` (else the top-level one);
* a layer gradient runs over the slice: ``t = i / (n - 1)`` for the slice's ``n`` layers
  (``t = 1`` when ``n = 1``);
* the tensors outside the layer stack come from the first slice (embeddings) and from the last
  slice (final norm, LM head), merged with that slice's sources and parameters, ``t = 0``;
* the written ``config.json`` takes the base's (else the first model's) with ``num_hidden_layers``
  (or ``n_layer`` ...) set to the total. Where the config lists one entry per layer
  (``layer_types``, e.g. sliding / full attention), the list is rebuilt from the layers taken —
  mergekit 0.1.5 leaves it as it was, which makes a model of another depth fail to load.

Each slice is parsed as the ``models:`` merge of its sources (so every method and parameter form
works per slice) and run over views of the inputs whose layer names are renumbered
(:class:`~lightning_merge.sources.base.RenamedSource`); the slices' tensor streams go into one
output folder, written atomically. Restrictions (clear errors): models with more than one layer
stack (mergekit needs ``modules:`` there too), a slice whose ``base_model`` is not one of its
sources when its method needs a base, PEFT and module outputs.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..naming import is_pre_layer, layer_of
from .recipe import MergeRecipe
from .refs import PathResolver
from .slices import LAYER_COUNT_FIELDS, model_path

log = logging.getLogger(__name__)

__all__ = ["LayeredRecipe", "SlicePart", "renumbered"]

#: config.json fields that must agree between the models of a slice (the depth may differ)
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                 "n_embd", "d_model", "head_dim")


class SlicePositions:
    """``t`` of mergekit's gradients for the tensors of one slice (duck-types ``LayerIndex``)."""

    def __init__(self, t_of: Mapping[str, float]):
        self._t = dict(t_of)

    def t(self, name: str) -> float:
        return self._t.get(name, 0.0)


@dataclass
class SlicePart:
    """One output slice: its models-form recipe, where its layers start, and how many."""

    index: int
    recipe: MergeRecipe
    #: resolved input path -> its first layer
    starts: dict[str, int]
    out_start: int
    n_layers: int
    pre: bool = False   # plans the embeddings
    post: bool = False  # plans the final norm and head

    def start_of(self, path: str) -> int:
        for p, s in self.starts.items():
            if PathResolver.same(p, path):
                return s
        raise ConfigError(f"slices[{self.index}]: '{path}' is not one of the slice's sources")


def renumbered(keys: Sequence[str], stack: str, start: int, n: int, out_start: int,
               pre: bool, post: bool) -> dict[str, str]:
    """``output name -> name in the model`` for one model's part of a slice: layers ``start ..
    start + n - 1`` of ``stack`` become ``out_start ..``; non-layer tensors are kept under their
    own names when the slice plans them (``pre``: embeddings, ``post``: the rest)."""
    mapping: dict[str, str] = {}
    for k in keys:
        parts = layer_of(k)
        if parts is None or not parts[0].endswith(stack):
            if (is_pre_layer(k) and pre) or (not is_pre_layer(k) and post):  # mergekit's pre / post weights
                mapping[k] = k
            continue
        prefix, i, rest = parts
        if start <= i < start + n:
            new = f"{prefix}.{out_start + i - start}"
            mapping[f"{new}.{rest}" if rest else new] = k
    return mapping


def layer_stacks(keys: Sequence[str]) -> dict[str, int]:
    """``stack -> number of layers`` among tensor names (``model.layers`` -> 32)."""
    stacks: dict[str, int] = {}
    for k in keys:
        parts = layer_of(k)
        if parts is not None:
            stacks[parts[0]] = max(stacks.get(parts[0], 0), parts[1] + 1)
    return stacks


def _stack_suffix(stack: str) -> str:
    """The stack's name without wrapper prefixes (``model.layers`` and ``layers`` match)."""
    return stack.split(".")[-1] if stack else stack


def _config(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


@dataclass
class LayeredRecipe:
    """A parsed layer-range ``slices:`` config (see the module doc); ``merge`` writes the model."""

    parts: list[SlicePart]
    merge_method: str
    donor: str
    out_dtype: torch.dtype | None = None
    seed: int | None = None
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    #: the models-form interface the CLI reads (one name per concept: the first slice's method)
    tensor_params: None = None

    @property
    def method(self) -> Any:
        return self.parts[0].recipe.method

    @property
    def base(self) -> str:
        return self.donor

    @property
    def experts(self) -> list[str]:
        seen: list[str] = []
        for part in self.parts:
            for p in [part.recipe.base, *part.recipe.experts]:
                if p is not None and not PathResolver.same(p, self.donor) and not any(
                        PathResolver.same(p, q) for q in seen):
                    seen.append(p)
        return seen

    @property
    def weights(self) -> list[float]:
        return list(self.parts[0].recipe.weights)

    @property
    def n_layers(self) -> int:
        return sum(p.n_layers for p in self.parts)

    def summary(self) -> list[str]:
        """One line per slice: output layers, sources and the method's settings."""
        from ..applied import applied_values

        lines = []
        for p in self.parts:
            srcs = ", ".join(f"{path} layers {s}-{s + p.n_layers - 1}" for path, s in p.starts.items())
            what = applied_values(p.recipe, [])[0].removeprefix("every tensor: ")
            lines.append(f"layers {p.out_start}-{p.out_start + p.n_layers - 1}: {type(p.recipe.method).__name__} "
                         f"of {srcs} ({what})")
        return lines

    def merge(self, out: Any, *, device: str | torch.device = "cpu", seed: int | None = None,
              out_dtype: torch.dtype | str | None = None, overwrite: bool = False, progress: bool | None = None,
              out_format: str | None = None, max_shard_bytes: int = 2 * 1024**3, adapter_rank: int = 16,
              **kwargs: Any) -> Path:
        """Write the layered model to ``out`` (an HF folder, or one ``.safetensors`` file).
        ``adapter_rank`` is accepted (the CLI passes it) and unused: a PEFT output is refused."""
        from .. import preflight
        from ..api import parse_dtype
        from ..engine import build_plan, run_plan
        from ..sources.base import RenamedSource
        from ..sources.resolve import open_source

        if out_format == "peft" or kwargs:
            raise ConfigError("slices: a layer-range merge writes a full model (an HF folder or a .safetensors "
                              "file); a PEFT adapter output is not supported for it")
        if not isinstance(out, (str, os.PathLike)):
            raise ConfigError(f"slices: a layer-range merge writes to a path, got {type(out).__name__}")
        dev = preflight.resolve_device(device)
        if isinstance(out_dtype, str):
            out_dtype = parse_dtype(out_dtype)
        out_dtype = out_dtype if out_dtype is not None else self.out_dtype
        seed = seed if seed is not None else (self.seed or 0)
        paths = [self.donor, *self.experts]
        preflight.check_output(out, paths, overwrite)
        for note in self.notes:
            log.warning("%s", note)

        opened: dict[str, Any] = {}

        def src(path: str) -> Any:
            for p, s in opened.items():
                if PathResolver.same(p, path):
                    return s
            opened[path] = open_source(path)
            return opened[path]

        try:
            plans, layer_src = [], []
            for part in self.parts:
                r = part.recipe
                inputs = [r.base, *r.experts]
                views = []
                for path in inputs:
                    s = src(path)
                    stacks = layer_stacks(s.keys())
                    stack = max(stacks, key=stacks.get) if stacks else ""
                    view = RenamedSource(s, renumbered(s.keys(), stack, part.start_of(path), part.n_layers,
                                                       part.out_start, part.pre, part.post))
                    view.config_dir = None  # depths differ by design; shapes were checked when parsing
                    views.append(view)
                tp = r.tensor_params
                if tp is not None:
                    names = views[0].keys()
                    t = {}
                    for n in names:
                        parts = layer_of(n)
                        if parts is not None and part.out_start <= parts[1] < part.out_start + part.n_layers:
                            i = parts[1] - part.out_start
                            t[n] = i / (part.n_layers - 1) if part.n_layers > 1 else 1.0
                    tp.layer_index = SlicePositions(t)  # type: ignore[assignment]
                plans.append(build_plan(views[0], views[1:], r.method, weights=r.weights, seed=seed, device=dev,
                                        out_dtype=out_dtype, tensor_params=tp))
                layer_src.extend((r.base, part.start_of(r.base) + i) for i in range(part.n_layers))
            layout = [(t.name, t.shape, t.out_dtype) for plan in plans for t in plan.tasks]
            dup = [n for n, c in Counter(name for name, _, _ in layout).items() if c > 1]
            if dup:  # cannot happen by construction; a guard against silently overwritten tensors
                raise ConfigError(f"slices: tensor '{dup[0]}' would be written by two slices")
            stream: Iterator[tuple[str, torch.Tensor]] = itertools.chain.from_iterable(
                run_plan(plan, progress=progress) for plan in plans)
            inputs_all = preflight.input_paths(paths)
            meta = {"lightning_merge_method": f"slices:{self.merge_method}"}
            if str(out).endswith(".safetensors") or out_format == "safetensors":
                from ..targets.shards import save_state_dict_file

                return save_state_dict_file(stream, out, overwrite=overwrite, layout=layout, inputs=inputs_all,
                                            metadata=meta)
            from ..targets.hf import save_hf_folder

            return save_hf_folder(stream, out, config_dir=self.donor if os.path.isdir(self.donor) else None,
                                  overwrite=overwrite, max_shard_bytes=max_shard_bytes, layout=layout,
                                  inputs=inputs_all, metadata=meta, config_updates=self._config_updates(layer_src))
        finally:
            for s in opened.values():
                s.close()

    def _config_updates(self, layer_src: list[tuple[str, int]]) -> dict[str, Any]:
        cfg = _config(self.donor)
        updates: dict[str, Any] = {}
        for key in LAYER_COUNT_FIELDS:
            if isinstance(cfg.get(key), int):
                updates[key] = len(layer_src)
        if not updates:
            log.warning("slices: '%s/config.json' has none of %s; the written config keeps the donor's depth",
                        self.donor, list(LAYER_COUNT_FIELDS))
        for key, value in cfg.items():  # per-layer lists, e.g. layer_types
            if isinstance(value, list) and cfg.get("num_hidden_layers") == len(value) and key != "architectures":
                rebuilt = []
                for path, i in layer_src:
                    theirs = _config(path).get(key)
                    rebuilt.append(theirs[i] if isinstance(theirs, list) and i < len(theirs) else value[0])
                updates[key] = rebuilt
        return updates


def check_slice_models(index: int, paths: Sequence[str]) -> None:
    """The models of one slice have the same layer shapes (their depth may differ)."""
    configs = [(p, _config(p)) for p in paths]
    first_path, first = configs[0]
    for p, c in configs[1:]:
        diff = [k for k in _SHAPE_FIELDS if k in first and k in c and first[k] != c[k]]
        if diff:
            raise ConfigError(f"slices[{index}]: '{p}' and '{first_path}' have different layer shapes "
                              f"({diff[0]}: {c[diff[0]]!r} vs {first[diff[0]]!r}); the sources of a slice "
                              "must share an architecture")


def build_layered(cfg: Mapping[str, Any], resolve: PathResolver, parse_models: Callable[[dict], MergeRecipe],
                  ranges: list[list[tuple[str, Any, int, int]]], source: str | None) -> LayeredRecipe:
    """A :class:`LayeredRecipe` from validated slices: ``ranges[k]`` lists slice k's sources as
    ``(resolved path, model entry as written, start, stop)``; ``parse_models`` parses a
    ``models:`` config (the slice as a merge of its sources)."""
    slices = cfg["slices"]
    base_written = cfg.get("base_model")
    parts: list[SlicePart] = []
    out_start = 0
    for k, (sl, srcs) in enumerate(zip(slices, ranges, strict=True)):
        lengths = {stop - start for _, _, start, stop in srcs}
        if len(lengths) != 1:
            detail = ", ".join(f"{p} {stop - start}" for p, _, start, stop in srcs)
            raise ConfigError(f"slices[{k}]: every source of a slice must cover the same number of layers "
                              f"(got {detail}); adjust the layer_range values")
        check_slice_models(k, [p for p, _, _, _ in srcs])
        n = lengths.pop()
        base = sl.get("base_model", base_written)
        models = [{"model": entry, **({"parameters": s["parameters"]} if s.get("parameters") is not None else {})}
                  for (_, entry, _, _), s in zip(srcs, sl["sources"], strict=True)]
        sub = {key: v for key, v in cfg.items() if key not in ("slices", "base_model", "models")}
        sub["models"] = models
        if sl.get("parameters") is not None:
            if not isinstance(sl["parameters"], Mapping):
                raise ConfigError(f"slices[{k}].parameters: expected a mapping of parameter -> value")
            sub["parameters"] = {**(cfg.get("parameters") or {}), **sl["parameters"]}
        base_path = model_path(base) or "" if base is not None else ""
        in_slice = base is not None and any(PathResolver.same(resolve(base_path), p) for p, _, _, _ in srcs)
        if in_slice:
            sub["base_model"] = base
        try:
            recipe = parse_models(sub)
        except ConfigError as e:
            hint = ""
            if base is not None and not in_slice and "base_model" in str(e):
                hint = (f" (slices[{k}]: base_model '{base_path}' is not one of this slice's sources; add it "
                        "as a source with the same layer_range)")
            raise ConfigError(f"slices[{k}]: {e}{hint}") from None
        tok = recipe.tokenizer
        if tok is not None and not (tok.source == "base" and not tok.tokens and tok.pad_to_multiple_of is None
                                    and tok.chat_template is None):
            raise ConfigError(f"{tok.key}: tokenizer forms other than the base's tokenizer (and chat_template) "
                              "are not supported with layer-range slices yet; merge with 'tokenizer_source: base' "
                              "and set the tokenizer afterwards, or use 'models:'")
        parts.append(SlicePart(k, recipe, {p: start for p, _, start, _ in srcs}, out_start, n,
                               pre=k == 0, post=k == len(slices) - 1))
        out_start += n
    donor = resolve(model_path(base_written) or "") if base_written is not None else parts[0].recipe.base
    return LayeredRecipe(parts, parts[0].recipe.merge_method, donor, parts[0].recipe.out_dtype,
                         parts[0].recipe.seed, [n for p in parts for n in p.recipe.notes], source)
