# ruff: noqa: E501  -- the docstring's Markdown tables (copied into the README) need long lines
"""Read mergekit YAML merge configurations (the ``lightning-merge merge`` command).

## Merging from a mergekit YAML

`lightning-merge merge CONFIG.yaml OUT/` reads the YAML that mergekit 0.1.5 users already write
and writes a merged Hugging Face folder that reproduces mergekit's model: the same tensors for
the deterministic methods (float32 rounding aside) and the same distribution for DARE and DELLA.
Their random masks cannot be bit-identical: mergekit draws from the global torch generator in
processing order, lightning_merge from one generator per (seed, tensor, expert), so a result does
not depend on tensor order, device count or rank.

It works by *translating* every mergekit setting into our methods' explicit parameters, mergekit's
defaults included. Our own defaults (which follow the papers: e.g. `Ties(density=0.2)`,
`DareTies(normalize=True, rescale="inverse_prob")`) are never used for a mergekit method name.

```
lightning-merge merge CONFIG OUT [--device cpu|cuda|cuda:N] [--seed N] [--out-dtype DTYPE]
                                 [--overwrite] [--progress | --no-progress]
```

```python
from lightning_merge.mergekit_config import parse_config
recipe = parse_config("ties.yaml")       # or an already-loaded dict
print(recipe.method)                      # Ties(density=0.5, normalize=True, ...)
recipe.merge("out/", seed=0)              # calls lightning_merge.merge_models
```

### YAML keys

| key | meaning |
|---|---|
| `merge_method` | required: a mergekit name from the table below, or one of our own methods (`adaptive_rms`, `dppa`, ...) with *our* parameter names (`lambda` = `lambda_`; per model: `weight` and the method's per-expert parameters) |
| `base_model` | the pre-trained model: HF folder, `.safetensors`, `.ckpt` |
| `models` | list of `{model: PATH, parameters: {...}}`. `PATH`: HF folder, `.safetensors`/`.ckpt` file, or a PEFT LoRA adapter folder (a delta expert on top of `base_model`); `BASE+ADAPTER` (or `{model: BASE, lora: ADAPTER}`) when `BASE` is the `base_model` |
| `parameters` | global parameters; a model's own `parameters` take precedence |
| `dtype` | mergekit's compute dtype. We always compute in float32; `dtype` only sets the output dtype when `out_dtype` is absent (as mergekit's output is in `dtype` then) |
| `out_dtype` | dtype of the written tensors (`--out-dtype` overrides it); absent: each tensor keeps the base tensor's dtype |
| `tokenizer_source` | absent or `base`: the base model's tokenizer files are copied; resized embeddings are truncated to the base vocabulary (what mergekit gives when the experts' vocabularies extend the base's by appending tokens). `union` or a model: refused (not supported yet) |
| `tokenizer` | `{source: base}` as above; `tokens` and other sources are refused |
| `seed` | (ours; mergekit ignores it) the seed of DARE/DELLA, overridden by `--seed`; default 0 |
| `slices` | one slice taking every layer of every source (mergekit's README form): the `models:` merge, source parameters per model, slice parameters over the global ones (`lightning_merge.mergekit_slices`); layer-range slices (sub-ranges, several slices, frankenmerges) refused |
| `modules`, `chat_template` | refused: per-module merges are not supported yet; set a chat template on the tokenizer after merging |

Relative paths are read relative to the working directory (as mergekit does), else relative to
the YAML file's folder.

### Parameter values: scalars, gradients, filters (exactly as mergekit)

* a scalar;
* a *gradient*, a list of numbers interpolated over the layer index: a tensor of layer `i` of `N`
  (`...layers.i.`, `...h.i.`, `...blocks.i.`, `...block.i.`, `...layer.i.`) gets
  `t = i / (N - 1)` (`t = 1` when `N = 1`); every other tensor (embeddings, final norm,
  `lm_head`) gets `t = 0`. With `s = t * (len - 1)` and `i0 = floor(s)` the value is
  `(1 - (s - i0)) * v[i0] + (s - i0) * v[i0 + 1]`; a list of booleans or strings picks
  `v[floor(s)]`. `N` is counted per layer stack from the base model's tensor names;
* a list of `{filter: SUBSTRING, value: V}`: the first entry whose `filter` is a substring of the
  tensor name (or is absent, or `"*"`) gives `V`, itself a scalar or a gradient; when none
  matches, the next scope is tried (per-model, then global, then the default).

### Method mapping, mergekit 0.1.5 → lightning_merge

Every parameter below is passed explicitly; `[x]` is mergekit's default. `w` is the per-model
`weight` (default 1.0; mergekit requires it), `d` the per-model `density` [1.0], `λ` the global
`lambda` [1.0]. **`rescale: true` → `rescale="l1"`**: mergekit 0.1.5 rescales a sparsified delta
by matching its L1 norm to the unpruned delta's, per whole tensor (`sparsify.rescaled_masked_tensor`),
*not* by 1/density; `rescale: false` → `rescale="none"`.

| mergekit `merge_method` | lightning_merge |
|---|---|
| `linear` | `Linear(normalize=normalize [true])`, weights `w`. `base_model` is *not* a base here: as in mergekit, an unlisted `base_model` becomes one more averaged input (weight: the global `parameters.weight`), with a warning |
| `task_arithmetic` | `TaskArithmetic(lambda_=λ, normalize=normalize [false])`, weights `w`; `density`/`rescale` have no effect (no sparsifier, as in mergekit; a warning says so) |
| `ties` | `Ties(density=d, normalize=normalize [true], lambda_=λ, trim_scope="tensor", trim_rule="exact_k", election="weighted", divisor="weights", zero_sign="positive")`; `rescale: true` is refused |
| `dare_ties` | `DareTies(density=d, rescale=rescale [true → "l1"], normalize=normalize [false], lambda_=λ, zero_sign="positive", extra_trim_density=None)` |
| `dare_linear` | `DareLinear(density=d, rescale=rescale [true → "l1"], normalize=normalize [false], lambda_=λ)` |
| `breadcrumbs` | `Breadcrumbs(density=d, gamma=gamma [0.01], rescale=rescale [false → "none"], normalize=normalize [false], lambda_=λ)` |
| `breadcrumbs_ties` | `BreadcrumbsTies(...same..., zero_sign="positive")` |
| `della` | `Della(density=d, epsilon=2·e [e = 0.15 → 0.3], rescale=rescale [true → "l1"], normalize=normalize [true], lambda_=λ, rank_scope="row", prob_formula="code", zero_sign="positive")` |
| `della_linear` | `DellaLinear(...same..., normalize=normalize [false])` |
| `slerp` | `Slerp(t=t)` (`t` required, as in mergekit); base = `base_model`, expert = the one other model |
| `model_stock` | `ModelStock(filter_wise=filter_wise [false])`; at least 2 models besides `base_model`; no `weight` |
| `ram` | `Ram(epsilon=epsilon [1e-5])`; base = `base_model`; no `weight` |
| `ramplus_tl` | `RamPlusTL(r=r [0.1], alpha=alpha [0.2], epsilon=epsilon [1e-5])`; base = `base_model`; no `weight` |
| `passthrough` | `Passthrough(scale=scale [none: copy])`, `scale` per model or global (filters, gradients); exactly one model; `base_model` absent or equal to it; no `weight`. The `slices:` form is a config form, not this method |
| `int8_mask` | accepted by the task-arithmetic family, no effect (it only changes mergekit's mask dtype) |
| `sce` | `Sce(select_topk=select_topk [1.0], uniform_below=1e-6)`; base = `base_model`; `int8_mask` no effect; no `weight`, no `normalize` (mergekit's sce has neither: it ignores them) |
| `nearswap` | `Nearswap(t=t)` (`t` required); base = `base_model`, exactly one other model; no `weight` |
| `arcee_fusion` | `ArceeFusion(quantile_sample=1000000)`; base = `base_model`, exactly one other model; no parameters, no `weight` |
| `nuslerp` | `NuSlerp(dim=None if nuslerp_flatten [true] else (0 if nuslerp_row_wise [false] else -1), task_vectors=<base_model given>)`, `t = w₂/(w₁+w₂)` from the per-model `weight`; exactly 2 models besides `base_model` (optional: with it the task vectors are interpolated) |
| `multislerp` | `MultiSlerp(normalize_weights=normalize_weights [true], eps=eps [1e-8], task_vectors=<base_model given>)`, weights `w`; at least 1 model besides `base_model` (optional, as for `nuslerp`) |
| `karcher` | `Karcher(max_iter=max_iter [10], tol=tol [1e-5])`; no `weight`; as for `linear`, an unlisted `base_model` is one more input |

Per-model parameters (`weight`, `density`, `epsilon`, `gamma`) become per-expert lists
(`Della(epsilon=[0.2, 0.4])`); shared ones (`lambda`, `normalize`, `rescale`, `int8_mask`, `t`,
`filter_wise`) must be global.

### And back: lightning_merge → mergekit YAML

| lightning_merge | mergekit YAML |
|---|---|
| `Della(epsilon=ε)` / `DellaLinear(epsilon=ε)` | `epsilon: ε/2` (mergekit's `epsilon` is the half-width of the window) |
| `rescale="l1"` / `rescale="none"` | `rescale: true` / `rescale: false` |
| `rescale="inverse_prob"` (our DARE/DELLA default: the papers' 1/(1 − p), per element) | none in 0.1.5 (mergekit ≤ 2024 did this); `"l2"`, `"linf"`: none either |
| `lambda_=λ` | `parameters: {lambda: λ}` |
| `weights=[w1, w2]` | `models[i].parameters.weight` |
| `density=[d1, d2]` | `models[i].parameters.density` |
| `DareTies()` (our default `normalize=True`: the disjoint mean of the DELLA paper's DARE baseline) | `normalize: true` (mergekit's default `false` sums the elected deltas) |
| `Ties()` (our default `density=0.2`, the paper's k = 20 %) | `density: 0.2` (mergekit's default 1.0 trims nothing) |
| `Della()` (our default `density=0.5, epsilon=0.14, rescale="inverse_prob"`) | `density: 0.5, epsilon: 0.07`; the per-element rescale has no 0.1.5 equivalent |
| `trim_scope="global"`, `trim_rule="official"`, `election="unweighted"`, `divisor="count"`, `zero_sign="majority"`, `rank_scope="layer"`, `prob_formula="paper"`, `extra_trim_density`, `dot_threshold` | none (mergekit trims per tensor, exactly k, elects on weighted deltas); use the Python API |

### Where we differ from mergekit 0.1.5 on purpose

* mergekit silently ignores unknown keys and parameters (a typo such as `densty: 0.5` is dropped,
  leaving density 1.0), and shared parameters written per model (`models[0].parameters.lambda`);
  we refuse them with an error naming the key and what to change.
* `ties`: mergekit keeps `max(1, floor(d·n))` entries per tensor, we keep exactly `floor(d·n)`
  (they differ only when `d·n < 1`). Ties in `|δ|` are broken by index here, arbitrarily there.
* DELLA: mergekit requires `d + e < 1` strictly (we accept `d + ε/2 ≤ 1`), and a row of one
  element (a 1-element tensor or an `[n, 1]` matrix) makes it fail with a 0/0 probability; we use
  the keep probability `d`.
* Negative weights in the sign-electing methods (`ties`, `dare_ties`, `della`,
  `breadcrumbs_ties`) are refused: mergekit elects on `sign(w·δ)`, so a negatively weighted model
  votes with its sign flipped. `linear` with weights summing to 0 divides by 1 here, by 0 there.
* We compute in float32 whatever `dtype` says (mergekit computes in `dtype`, e.g. bfloat16).
* A missing `weight` is 1.0 (mergekit stops with "Missing required parameter weight").
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .mergekit_slices import slices_as_models
from .methods.base import MergeMethod
from .methods.registry import MERGEKIT_0_1_5, mergekit_specs, method_class
from .methods.yaml_spec import REQUIRED, MergekitSpec, YamlParam, collapse
from .naming import LAYER_RE
from .yaml_io import load_yaml

log = logging.getLogger(__name__)

__all__ = [
    "MERGEKIT_METHODS",
    "LayerIndex",
    "MergeRecipe",
    "MergekitTensorParams",
    "evaluate_setting",
    "load_yaml",
    "parse_config",
]

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "seed", "slices", "modules",
)
_REQUIRED = REQUIRED
_Param = YamlParam
_Spec = MergekitSpec
_collapse = collapse

#: mergekit merge_method -> its spec, for the registered classes that have one
MERGEKIT_METHODS: dict[str, MergekitSpec] = {name: spec for name, (_, spec) in mergekit_specs().items()}
#: mergekit 0.1.5's methods that no registered class implements yet
UNSUPPORTED_MERGEKIT = tuple(n for n in MERGEKIT_0_1_5 if n not in MERGEKIT_METHODS)


# ------------------------------------------------------------------------------ setting evaluation

def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def _validator(kind: str, key: str) -> Callable[[Any], Any]:
    """Coerce a YAML scalar like pydantic's lax mode does (numeric strings, 0/1 booleans)."""

    def as_float(v: Any) -> float:
        if isinstance(v, bool):
            return 1.0 if v else 0.0
        try:
            out = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {v!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {v!r}")
        return out

    def as_bool(v: Any) -> bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "t", "y", "1"):
            return True
        if isinstance(v, str) and v.strip().lower() in ("false", "no", "off", "f", "n", "0"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {v!r}")

    def as_any(v: Any) -> Any:
        return v

    return {"float": as_float, "bool": as_bool}.get(kind, as_any)


def _check_setting(setting: Any, key: str) -> None:
    """Raise ConfigError unless ``setting`` has mergekit's ParameterSetting shape."""
    if _is_scalar(setting):
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list):
        if all(_is_scalar(e) for e in setting):
            return
        if not all(isinstance(c, Mapping) for c in setting):
            raise ConfigError(
                f"{key}: a list must hold only numbers (a gradient over layers) or only "
                f"{{filter: ..., value: ...}} entries, got {setting!r}"
            )
        for i, cond in enumerate(setting):
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown or "value" not in cond:
                raise ConfigError(
                    f"{key}[{i}]: a conditional entry needs 'value' and optionally 'filter' "
                    f"(a substring of the tensor name), got keys {sorted(cond)}"
                )
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise ConfigError(f"{key}[{i}].filter: must be a string, got {cond['filter']!r}")
            v = cond["value"]
            if not (_is_scalar(v) or (isinstance(v, list) and all(_is_scalar(e) for e in v))):
                raise ConfigError(f"{key}[{i}].value: must be a scalar or a list of numbers, got {v!r}")
        return
    if setting is None:
        raise ConfigError(f"{key}: has no value; give a number, a list or remove the key")
    raise ConfigError(f"{key}: unexpected value {setting!r}")


def evaluate_setting(setting: Any, tensor_name: str, t: float, validate: Callable[[Any], Any]) -> Any:
    """mergekit 0.1.5 ``config.evaluate_setting``: resolve filters and gradients for one tensor.

    Returns None when a list of filters has no entry matching ``tensor_name``.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return validate(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_scalar(e) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return validate((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t, validate)
    return None


def _leaf_values(setting: Any) -> list[Any]:
    """Every scalar a setting can produce (gradient endpoints included)."""
    if _is_scalar(setting):
        return [setting]
    if isinstance(setting, Mapping):
        setting = [setting]
    out: list[Any] = []
    for e in setting:
        out.extend(_leaf_values(e["value"]) if isinstance(e, Mapping) else [e])
    return out


def _tensor_dependent(setting: Any) -> bool:
    """True when the value can differ between tensors (a gradient or a filter)."""
    if _is_scalar(setting):
        return False
    if isinstance(setting, Mapping):
        setting = [setting]
    if all(_is_scalar(e) for e in setting):
        return len(set(map(repr, setting))) > 1
    conds = list(setting)
    if len(conds) == 1 and conds[0].get("filter") in (None, "*"):
        return _tensor_dependent(conds[0]["value"])
    return True


# ------------------------------------------------------------------------------------- layer index



class LayerIndex:
    """Maps a tensor name to mergekit's gradient position ``t``.

    A name like ``model.layers.5.mlp.up_proj.weight`` is layer 5 of the stack ``model.layers``; with
    N layers in that stack (the largest index + 1 among the base model's names), ``t = 5/(N-1)``
    (``t = 1`` when N = 1). Names outside any layer stack get ``t = 0`` (mergekit plans embeddings,
    the final norm and the head with t = 0).
    """

    def __init__(self, names: Sequence[str]):
        self.counts: dict[str, int] = {}
        for n in names:
            m = LAYER_RE.match(n)
            if m:
                self.counts[m.group(1)] = max(self.counts.get(m.group(1), 0), int(m.group(2)) + 1)

    def t(self, name: str) -> float:
        m = LAYER_RE.match(name)
        if not m:
            return 0.0
        n = self.counts.get(m.group(1), int(m.group(2)) + 1)
        return int(m.group(2)) / (n - 1) if n > 1 else 1.0


# ----------------------------------------------------------------------------- per-tensor resolver

class MergekitTensorParams:
    """The engine's ``tensor_params``: ``name -> {our param: value, "weights": [...]}``.

    Resolves every parameter for one tensor with mergekit's precedence (per-model → global →
    default), filters and layer gradients, then translates to our method's parameters. Needs the
    layer counts (:class:`LayerIndex`) when a gradient is used: set :attr:`layer_index`, or give
    ``names_loader`` (called once, returns the base model's tensor names).
    """

    def __init__(
        self,
        resolve: Callable[[str, float], tuple[dict[str, Any], list[float]]],
        *,
        layer_index: LayerIndex | None = None,
        names_loader: Callable[[], Sequence[str]] | None = None,
    ):
        self._resolve = resolve
        self.layer_index = layer_index
        self._names_loader = names_loader
        self._cache: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str) -> dict[str, Any]:
        hit = self._cache.get(name)
        if hit is None:
            if self.layer_index is None:
                self.layer_index = LayerIndex(self._names_loader() if self._names_loader else [])
            params, weights = self._resolve(name, self.layer_index.t(name))
            hit = {**params, "weights": weights}
            self._cache[name] = hit
        return dict(hit)


# ------------------------------------------------------------------------------------------ recipe

@dataclass
class MergeRecipe:
    """A parsed configuration, ready for :func:`lightning_merge.api.merge_models`.

    Attributes:
        method: the method with every parameter resolved for tensors no filter or gradient
            touches (the per-tensor values come from ``tensor_params``).
        base: the base model spec passed to ``merge_models`` (for ``linear``: the config donor).
        experts: the expert specs (paths, adapter folders), in YAML order.
        weights: one weight per expert.
        tensor_params: per-tensor overrides, or None when no filter or gradient is used.
        out_dtype: from ``out_dtype`` (or ``dtype``); None keeps each base tensor's dtype.
        seed: the YAML ``seed``, or None.
        merge_method: the YAML's ``merge_method``.
        notes: translation remarks (logged when merging).
        source: the YAML file, if parsed from one.
    """

    method: MergeMethod
    base: str | None
    experts: list[str]
    weights: list[float]
    tensor_params: MergekitTensorParams | None = None
    out_dtype: torch.dtype | None = None
    seed: int | None = None
    merge_method: str = ""
    notes: list[str] = field(default_factory=list)
    source: str | None = None

    def check_tensors(self, names: Sequence[str]) -> None:
        """Resolve the per-tensor parameters of every name now (raises ConfigError before any output)."""
        if self.tensor_params is None:
            return
        self.tensor_params.layer_index = LayerIndex(names)
        for n in names:
            try:
                self.tensor_params(n)
            except ConfigError as e:
                raise ConfigError(f"tensor '{n}': {e}") from None

    def merge(
        self,
        out: Any,
        *,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        out_dtype: torch.dtype | str | None = None,
        overwrite: bool = False,
        progress: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the merge with :func:`lightning_merge.api.merge_models` (CLI-level overrides win)."""
        from .api import merge_models

        for note in self.notes:
            log.warning("%s", note)
        if self.tensor_params is not None:
            self.check_tensors(_tensor_names(self.base if self.base is not None else self.experts[0]))
        return merge_models(
            self.base, self.experts, self.method, weights=self.weights,
            seed=seed if seed is not None else (self.seed or 0), out=out, device=device,
            out_dtype=out_dtype if out_dtype is not None else self.out_dtype,
            tensor_params=self.tensor_params, overwrite=overwrite, progress=progress, **kwargs,
        )


def _tensor_names(spec: Any) -> list[str]:
    from .sources.resolve import open_source

    src = open_source(spec)
    try:
        return list(src.keys())
    finally:
        src.close()


# ----------------------------------------------------------------------------------------- parsing

def parse_config(config: Mapping[str, Any] | str | os.PathLike) -> MergeRecipe:
    """Parse a mergekit YAML (a path or an already-loaded dict) into a :class:`MergeRecipe`.

    Raises :class:`ConfigError` naming the YAML key at fault and what would fix it. Reads no
    tensors; relative model paths are resolved against the working directory, then against the
    YAML file's folder.
    """
    source = config_dir = None
    if isinstance(config, (str, os.PathLike)):
        source = str(config)
        config_dir = Path(config).resolve().parent
        config = load_yaml(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a mapping, got {type(config).__name__}")
    cfg = dict(config)
    paths = _PathResolver(config_dir)

    unknown = sorted(set(cfg) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level key; valid keys: {list(TOP_LEVEL_KEYS)}")
    if cfg.get("modules"):
        raise ConfigError("modules: per-module merges are not supported yet; use 'models:' or one whole-model "
                          "'slices:' entry")
    if cfg.get("slices"):
        cfg = slices_as_models(cfg, paths)
    if not isinstance(cfg.get("merge_method"), str):
        raise ConfigError("merge_method: missing; e.g. 'merge_method: ties'")
    spec = _spec_for(cfg["merge_method"])
    _check_tokenizer(cfg)
    out_dtype = _dtype(cfg)
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")

    base_ref = _base_ref(cfg.get("base_model"), paths)
    entries, is_base = _model_entries(cfg.get("models"), base_ref, paths)
    gparams = cfg.get("parameters") or {}
    if not isinstance(gparams, Mapping):
        raise ConfigError("parameters: expected a mapping of parameter -> value")
    gparams = dict(gparams)
    for pk, pv in gparams.items():
        _check_setting(pv, f"parameters.{pk}")
    _check_param_names(spec, gparams, entries)

    # ---- which inputs are experts, and which model is our base
    if spec.base == "input":  # mergekit linear: base_model is just one more input
        experts = list(entries)
        notes: list[str] = []
        if base_ref is not None and not any(is_base):
            experts.append(_Entry(base_ref, {}, "base_model"))
            weight = (" (weight: the global 'parameters.weight', default 1.0)" if "weight" in spec.params
                      else "")
            notes.append(
                f"{spec.name}: base_model is averaged as one more input, as in mergekit{weight}; drop "
                "base_model to average only the listed models"
            )
        donor = base_ref
        if donor is None:
            plain = [e.path for e in experts if not _is_adapter(e.path)]
            if len(plain) < len(experts):
                raise ConfigError("base_model: adapter models need the base model they were trained on; "
                                  "add 'base_model: PATH'")
            donor = plain[0]
    else:
        notes = []
        if base_ref is None and spec.base == "required":
            raise ConfigError(
                f"base_model: '{spec.name}' needs base_model (the pre-trained model the others were "
                "fine-tuned from); add 'base_model: PATH'"
            )
        experts = [e for e, b in zip(entries, is_base, strict=True) if not b]
        donor = base_ref if base_ref is not None else (experts[0].path if experts else None)
        if base_ref is None and any(_is_adapter(e.path) for e in experts):
            raise ConfigError("base_model: adapter models need the base model they were trained on; "
                              "add 'base_model: PATH'")
    n = len(experts)
    if n < spec.min_experts or (spec.max_experts is not None and n > spec.max_experts):
        want = (f"exactly {spec.min_experts}" if spec.max_experts == spec.min_experts
                else f"at least {spec.min_experts}")
        extra = " (slerp interpolates base_model and one other model)" if spec.name == "slerp" else ""
        besides = " besides base_model"
        if spec.base == "input":  # passthrough: base_model is an input (mergekit adds it when not listed)
            besides = ""
            if base_ref is not None and not any(is_base):
                extra += (" (base_model is not one of the listed models, so it is one more input, as in "
                          "mergekit; remove base_model or set it to the listed model)")
            elif spec.name == "passthrough":
                extra += " (passthrough copies one model; 'linear' averages several)"
        raise ConfigError(f"models: '{spec.name}' needs {want} model(s){besides}, got {n}{extra}")
    for pk, p in spec.params.items():
        if p.default is _REQUIRED and pk not in gparams and not p.per_model:
            raise ConfigError(f"parameters.{pk}: '{spec.name}' needs '{pk}'"
                              + _REQUIRED_HINTS.get(f"{spec.name}.{pk}", _REQUIRED_HINTS.get(pk, "")))

    resolver = _Resolver(spec, gparams, experts, has_base=base_ref is not None)
    our_name, kwargs, weights = resolver.resolve(None, 0.0, notes)
    try:
        method = _build_method(our_name, kwargs, f"merge_method '{spec.name}'")
    except ConfigError as e:
        raise ConfigError(f"{e}{_blame(str(e), gparams, experts)}") from None
    resolver.validate_candidates()

    settings = [gparams] + [e.params for e in experts]
    tp = None
    if any(_tensor_dependent(v) for s in settings for v in s.values()):
        tp = MergekitTensorParams(resolver.per_tensor, names_loader=lambda: _tensor_names(donor))
    return MergeRecipe(
        method=method, base=donor, experts=[e.path for e in experts], weights=weights, tensor_params=tp,
        out_dtype=out_dtype, seed=seed, merge_method=spec.name, notes=notes, source=source,
    )


_REQUIRED_HINTS = {"t": " (the interpolation factor: 0 = base_model, 1 = the other model), e.g. "
                        "'parameters: {t: 0.5}'",
                   "nearswap.t": " (the largest step of an entry from base_model toward the other model), "
                                 "e.g. 'parameters: {t: 0.0001}'"}


@dataclass(frozen=True)
class _Entry:
    path: str
    params: dict[str, Any]
    key: str  # the YAML key of its parameters, for messages


def _spec_for(merge_method: str) -> _Spec:
    name = merge_method.strip().lower().replace("-", "_")
    if name in MERGEKIT_METHODS:
        return MERGEKIT_METHODS[name]
    if name in UNSUPPORTED_MERGEKIT:
        raise ConfigError(
            f"merge_method: mergekit's '{name}' is not supported by lightning_merge; supported mergekit "
            f"methods: {sorted(MERGEKIT_METHODS)}"
        )
    cls = _ensure_registered(name)
    if cls is None:
        raise ConfigError(
            f"merge_method: unknown method '{merge_method}'; mergekit methods: {sorted(MERGEKIT_METHODS)}; "
            f"lightning_merge methods: {_all_method_names()}"
        )
    return _native_spec(cls)


def _native_spec(cls: type[MergeMethod]) -> _Spec:
    """One of our own methods, with our parameter names (YAML ``lambda`` is ``lambda_``)."""
    params: dict[str, _Param] = {"weight": _Param("float", 1.0, True)}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else _REQUIRED
        params["lambda" if f.name == "lambda_" else f.name] = _Param(
            "any", default, f.name in cls.per_expert_params
        )

    def translate(s: dict[str, Any], pm: dict[str, list[Any]], notes: list[str]) -> tuple[str, dict]:
        kw = {("lambda_" if k == "lambda" else k): v for k, v in s.items()}
        kw.update({k: _collapse(v) for k, v in pm.items() if k != "weight"})
        return cls.name, kw

    base = "required" if cls.requires_base else "optional"
    return _Spec(cls.name, params, base, translate, native=True)


def _ensure_registered(name: str) -> type[MergeMethod] | None:
    """Our method class registered as ``name`` (None when there is none)."""
    try:
        return method_class(name) if name else None
    except ConfigError as e:
        if "could not be imported" in str(e):
            raise
        return None


def _all_method_names() -> list[str]:
    from .methods.registry import method_names

    return method_names()


def _build_method(name: str, kwargs: dict[str, Any], where: str) -> MergeMethod:
    cls = _ensure_registered(name)
    if cls is None:
        raise ConfigError(f"merge_method: '{name}' is not available in this installation of lightning_merge")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: invalid parameters for '{name}': {e}") from None


def _check_tokenizer(cfg: dict[str, Any]) -> None:
    ts = cfg.get("tokenizer_source")
    if ts is not None and ts != "base":
        raise ConfigError(
            f"tokenizer_source: {ts!r} is not supported (only 'base': the base model's tokenizer, with "
            "resized embeddings truncated to it); remove the key or set 'tokenizer_source: base'"
        )
    tok = cfg.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, Mapping):
            raise ConfigError("tokenizer: expected a mapping like {source: base}")
        extra = sorted(set(tok) - {"source"})
        if extra:
            raise ConfigError(f"tokenizer.{extra[0]}: not supported; only 'tokenizer: {{source: base}}' is")
        if tok.get("source", "union") != "base":
            raise ConfigError(
                f"tokenizer.source: {tok.get('source', 'union')!r} is not supported (mergekit's default is "
                "'union'); use 'source: base' or remove 'tokenizer'"
            )
    if cfg.get("chat_template"):
        raise ConfigError("chat_template: not supported; set the tokenizer's chat template after merging")


def _dtype(cfg: dict[str, Any]) -> torch.dtype | None:
    from .api import parse_dtype

    out = None
    for key in ("dtype", "out_dtype"):  # out_dtype wins
        v = cfg.get(key)
        if v is None:
            continue
        try:
            out = parse_dtype(str(v))
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    return out


# ---------------------------------------------------------------------------------- model references

def _model_ref(entry: Any, key: str) -> tuple[str, str | None]:
    """mergekit's ModelReference: "path", "path+lora", or {model: path, lora: path}."""
    if isinstance(entry, str):
        return entry, None
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{key}: expected a model path, got {entry!r}")
    unknown = sorted(set(entry) - {"model", "lora", "override_architecture"})
    if unknown or "model" not in entry:
        raise ConfigError(f"{key}: expected a path or {{model: PATH, lora: PATH}}, got keys {sorted(entry)}")
    if entry.get("override_architecture"):
        raise ConfigError(f"{key}.override_architecture: not supported; remove it")

    def path_of(v: Any, k: str) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, Mapping) and isinstance(v.get("path"), str):
            if v.get("revision"):
                raise ConfigError(f"{k}.revision: lightning_merge reads local files only; download that "
                                  "revision and give its folder")
            return v["path"]
        raise ConfigError(f"{k}: expected a path, got {v!r}")

    lora = entry.get("lora")
    return path_of(entry["model"], f"{key}.model"), None if lora is None else path_of(lora, f"{key}.lora")


class _PathResolver:
    def __init__(self, config_dir: Path | None):
        self.config_dir = config_dir

    def __call__(self, p: str) -> str:
        """A relative path as given when it exists (relative to the working directory, like
        mergekit), else relative to the YAML file's folder when it exists there."""
        if os.path.isabs(p) or os.path.exists(p) or self.config_dir is None:
            return p
        alt = self.config_dir / p
        return str(alt) if alt.exists() else p

    @staticmethod
    def same(a: str, b: str) -> bool:
        if a == b:
            return True
        if os.path.exists(a) and os.path.exists(b):
            return os.path.realpath(a) == os.path.realpath(b)
        return os.path.normpath(a) == os.path.normpath(b)


def _split_ref(raw: str, lora: str | None, key: str, paths: _PathResolver) -> tuple[str, str | None]:
    """"base+adapter" -> (base path, adapter path); a path that exists is never split."""
    if lora is None and "+" in raw and not os.path.exists(paths(raw)):
        parts = raw.split("+")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{key}: cannot parse {raw!r}; use MODEL or MODEL+ADAPTER")
        raw, lora = parts
    if "@" in raw and not os.path.exists(paths(raw)):
        raise ConfigError(f"{key}: {raw!r} names a hub revision; lightning_merge reads local files only")
    return paths(raw), None if lora is None else paths(lora)


def _is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _base_ref(value: Any, paths: _PathResolver) -> str | None:
    if value is None:
        return None
    raw, lora = _model_ref(value, "base_model")
    base, adapter = _split_ref(raw, lora, "base_model", paths)
    if adapter is not None:
        raise ConfigError("base_model: a 'model+adapter' base is not supported; merge the adapter into the "
                          "model first (peft merge_and_unload) and give that folder")
    if _is_adapter(base):
        raise ConfigError(f"base_model: '{base}' is a PEFT adapter folder; give the full pre-trained model")
    return base


def _model_entries(
    models: Any, base_ref: str | None, paths: _PathResolver
) -> tuple[list[_Entry], list[bool]]:
    if not isinstance(models, list) or not models:
        raise ConfigError("models: missing or empty; list the models to merge as '- model: PATH'")
    entries: list[_Entry] = []
    is_base: list[bool] = []
    for i, m in enumerate(models):
        key = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, Mapping) or "model" not in m:
            raise ConfigError(f"{key}: expected {{model: PATH, parameters: {{...}}}}, got {m!r}")
        extra = sorted(set(m) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"{key}: unknown key(s) {extra}; a model entry has 'model' and 'parameters'")
        raw, lora = _model_ref(m["model"], f"{key}.model")
        path, adapter = _split_ref(raw, lora, f"{key}.model", paths)
        if adapter is not None:
            if base_ref is None or not _PathResolver.same(path, base_ref):
                raise ConfigError(
                    f"{key}.model: '{path}+{adapter}' applies an adapter to a model other than base_model; "
                    "only BASE+ADAPTER with BASE = base_model is supported (the adapter then is a delta "
                    "expert); otherwise merge the adapter into its model first (peft merge_and_unload)"
                )
            path = adapter
        params = m.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{key}.parameters: expected a mapping of parameter -> value")
        for pk, pv in params.items():
            _check_setting(pv, f"{key}.parameters.{pk}")
        for prev in entries:
            if _PathResolver.same(prev.path, path):
                raise ConfigError(f"{key}.model: '{path}' is listed twice (also in "
                                  f"{prev.key.removesuffix('.parameters')}); list each model once")
        entries.append(_Entry(path, dict(params), f"{key}.parameters"))
        is_base.append(adapter is None and base_ref is not None and _PathResolver.same(path, base_ref))
    return entries, is_base


# ------------------------------------------------------------------------------ parameter resolving

def _blame(message: str, gparams: dict[str, Any], experts: list[_Entry]) -> str:
    """' [set by: models[0].parameters.epsilon = 0.3, ...]' for the parameters ``message`` names."""
    named = set(re.findall(r"'(\w+)'", message))
    named |= {"lambda" for n in named if n == "lambda_"}
    hits = [f"parameters.{k} = {v!r}" for k, v in gparams.items() if k in named]
    hits += [f"{e.key}.{k} = {v!r}" for e in experts for k, v in e.params.items() if k in named]
    return f" [set by: {', '.join(hits)}]" if hits else " [mergekit's defaults]"


def _mergekit_param_names() -> set[str]:
    """Every parameter name some mergekit 0.1.5 method reads (from the registered specs)."""
    return {k for _, spec in mergekit_specs().values() for k in spec.params}


def _did_you_mean(pk: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(pk, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_param_names(spec: _Spec, gparams: dict[str, Any], entries: list[_Entry]) -> None:
    """Refuse a parameter no mergekit method knows (with a did-you-mean); one warning for those
    mergekit accepts and this method ignores (``weight`` on ``slerp``, ``density`` left on a
    ``linear`` model, a global parameter given per model), which are then dropped."""
    per_model = sorted(k for k, p in spec.params.items() if p.per_model)
    known = set() if spec.native else _mergekit_param_names()  # our own methods: mergekit has no say
    ignored: list[str] = []
    for pk in list(gparams):
        if pk not in spec.params:
            if pk not in known:
                raise ConfigError(f"parameters.{pk}: unknown parameter for '{spec.name}'; valid: "
                                  f"{sorted(spec.params)}{_hint(pk) or _did_you_mean(pk, list(spec.params))}")
            ignored.append(f"parameters.{pk}")
            del gparams[pk]
    for e in entries:
        for pk in list(e.params):
            if pk not in spec.params:
                if pk not in known:
                    raise ConfigError(f"{e.key}.{pk}: unknown parameter for '{spec.name}'; valid per-model "
                                      f"parameters: {per_model}{_hint(pk) or _did_you_mean(pk, per_model)}")
                ignored.append(f"{e.key}.{pk}")
                del e.params[pk]
            elif not spec.params[pk].per_model and spec.native:
                raise ConfigError(f"{e.key}.{pk}: '{pk}' is a global parameter of '{spec.name}'; move it to the "
                                  "top-level 'parameters:'")
            elif not spec.params[pk].per_model:
                ignored.append(f"{e.key}.{pk} (a global parameter of '{spec.name}': set it under the top-level "
                               "'parameters:')")
                del e.params[pk]
    if ignored:
        log.warning("'%s' ignores %s, as mergekit does; they have no effect on this merge", spec.name,
                    ", ".join(ignored))


def _hint(pk: str) -> str:
    if pk == "lambda_":
        return "; the YAML spells it 'lambda'"
    if pk in ("rank_scope", "prob_formula", "trim_scope", "trim_rule", "zero_sign", "election", "divisor",
              "extra_trim_density", "dot_threshold", "task_vectors"):
        return ("; it is a lightning_merge option with no mergekit equivalent: set it through the Python API "
                "(lightning_merge.merge_models)")
    if pk == "weights":
        return "; give 'weight' per model"
    if pk == "dim":
        return "; nuslerp spells it 'nuslerp_flatten: false' (rows) with 'nuslerp_row_wise: true' (columns)"
    return ""


def _resolve_one(pk: str, p: _Param, scopes: Sequence[Mapping[str, Any]], tensor_name: str | None,
                 t: float, key: str) -> Any:
    """mergekit's ``resolve_parameter``: the first scope with a value for this tensor, else the default."""
    validate = _validator(p.kind, key)
    for scope in scopes:
        if pk in scope:
            v = evaluate_setting(scope[pk], tensor_name or "", t, validate)
            if v is not None:
                return v
    if p.default is _REQUIRED:
        if tensor_name is None:  # the recipe-level method: a value given only under filters
            for scope in scopes:
                if pk in scope:
                    return validate(_leaf_values(scope[pk])[0])
        raise ConfigError(f"{key}: no value for tensor '{tensor_name}' (no filter matches it); add a "
                          "final entry without 'filter' as the default")
    return p.default


class _Resolver:
    """Resolves and translates one method's parameters, globally or for one tensor."""

    def __init__(self, spec: _Spec, gparams: dict[str, Any], experts: list[_Entry], has_base: bool = False):
        self.spec, self.gparams, self.experts = spec, gparams, experts
        self.has_base = has_base  # whether the YAML gives base_model (for spec.base_flag)

    def resolve(
        self,
        tensor_name: str | None,
        t: float,
        notes: list[str] | None = None,
        gparams: dict[str, Any] | None = None,
        per: list[dict[str, Any]] | None = None,
    ) -> tuple[str, dict[str, Any], list[float]]:
        """(our method name, its keyword arguments, the per-expert weights) for one tensor
        (``tensor_name=None``: for tensors that no filter and no gradient touches)."""
        g = self.gparams if gparams is None else gparams
        per = [e.params for e in self.experts] if per is None else per
        shared: dict[str, Any] = {}
        pm: dict[str, list[Any]] = {}
        for pk, p in self.spec.params.items():
            given = pk in g or (p.per_model and any(pk in prm for prm in per))
            if self.spec.native and not given and pk != "weight":
                continue  # our own method: our defaults fill what the YAML leaves out
            if not p.per_model:
                shared[pk] = _resolve_one(pk, p, [g], tensor_name, t, f"parameters.{pk}")
            else:
                pm[pk] = [_resolve_one(pk, p, [prm, g], tensor_name, t, f"{e.key}.{pk}")
                          for prm, e in zip(per, self.experts, strict=True)]
        weights = [float(w) for w in pm.pop("weight", [1.0] * len(per))]
        name, kwargs = self.spec.translate(shared, pm, notes if notes is not None else [])
        if self.spec.base_flag:
            kwargs[self.spec.base_flag] = self.has_base
        return name, kwargs, weights

    def per_tensor(self, tensor_name: str, t: float) -> tuple[dict[str, Any], list[float]]:
        name, kwargs, weights = self.resolve(tensor_name, t)
        _build_method(name, kwargs, f"merge_method '{self.spec.name}'")  # validates the values
        return kwargs, weights

    def validate_candidates(self) -> None:
        """Build the method with each value every setting can take (filter values, gradient
        endpoints), one setting at a time, so that a bad value fails now naming its YAML key."""
        scopes = [("parameters", self.gparams, None)] + [
            (e.key, e.params, i) for i, e in enumerate(self.experts)
        ]
        for prefix, params, idx in scopes:
            for pk, setting in params.items():
                if _is_scalar(setting):
                    continue  # already part of the recipe-level method
                p = self.spec.params[pk]
                key = f"{prefix}.{pk}"
                validate = _validator(p.kind, key)
                for leaf in _leaf_values(setting):
                    g = dict(self.gparams)
                    per = [dict(e.params) for e in self.experts]
                    (g if idx is None else per[idx])[pk] = validate(leaf)
                    name, kwargs, _ = self.resolve(None, 0.0, gparams=g, per=per)
                    _build_method(name, kwargs, key)
