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
from lightning_merge.mergekit import parse_config
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
| `tokenizer_source` | absent: the base model's tokenizer files are copied; resized embeddings are truncated to the base vocabulary (what mergekit gives when the experts' vocabularies extend the base's by appending tokens). `base`, `union` or a model path: the output tokenizer is built as mergekit 0.1.5 builds it (`base`: the base's; `union`: the base's plus every other model's tokens, models in YAML order; a model: that model's) and saved instead of the base's; every model's embedding and LM-head rows are re-indexed to it by token (a token a model lacks: the only model's row that has it, else the base's, else the mean of those that have it; zero when none has it); `config.json` `vocab_size` is set to its size (`lightning_merge.mergekit.tokenizer`, `.vocabulary`). A model without tokenizer files is read with the base's vocabulary (a warning); the base, or a model named here, must have one |
| `tokenizer` | `{source: S, tokens: {TOKEN: {source: ..., force: bool}}, pad_to_multiple_of: N}`, S `base`, `union` or a model path as above, defaulting to `union` (as in mergekit). `tokens`: each token is added when the vocabulary lacks it; its row, for the models that lack it (every model with `force: true`), comes from `source`: a merged model's row for that token, `{kind: model_token, model: M, token: T}` or `{..., token_id: I}` (M's own row), or `{kind: zero}`; no `source`: the automatic rule above (mergekit fails there). `pad_to_multiple_of`: rows (and `vocab_size`) padded with each model's mean row |
| `seed` | (ours; mergekit ignores it) the seed of DARE/DELLA, overridden by `--seed`; default 0 |
| `dialect` | (ours) `mergekit` (default): a mergekit name means mergekit's parameters, defaults and semantics; `lightning_merge`: `merge_method` is our class's registered name and the parameters are its fields with our defaults (e.g. `ties` with `trim_rule: official`), the form `lightning_merge.mergekit.native.native_config(method, base, experts, weights)` writes for any merge |
| `slices` | one slice taking every layer of every source (mergekit's README form): the `models:` merge, source parameters per model, slice parameters over the global ones (`lightning_merge.mergekit.slices`). Layer-range slices (sub-ranges, several slices: frankenmerges, per-slice merges): the model is built slice by slice with renumbered layers and `num_hidden_layers` (and per-layer lists such as `layer_types`) rewritten (`lightning_merge.mergekit.layered`) |
| `chat_template` | a mergekit built-in name (`chatml`, `llama3`, `alpaca`, `mistral`, `exaone`: read from the installed mergekit package), `auto` (the most common template among the inputs' tokenizers, base first; none: the tokenizer's own) or a literal Jinja template; set on the output tokenizer (without a tokenizer form: on the base's tokenizer, re-saved), written by `save_pretrained` (`chat_template.jinja`), as mergekit does |
| `modules` | refused: per-module merges are not supported yet |

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
| `model_stock` | `ModelStock(filter_wise=filter_wise [false], filter_view="last_dim")`; at least 2 models besides `base_model`; no `weight` |
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

from ..yaml_io import load_yaml
from .parse import MERGEKIT_METHODS, TOP_LEVEL_KEYS, UNSUPPORTED_MERGEKIT, parse_config
from .recipe import MergeRecipe
from .settings import LayerIndex, MergekitTensorParams, evaluate_setting

__all__ = [
    "MERGEKIT_METHODS",
    "TOP_LEVEL_KEYS",
    "UNSUPPORTED_MERGEKIT",
    "LayerIndex",
    "MergeRecipe",
    "MergekitTensorParams",
    "evaluate_setting",
    "load_yaml",
    "parse_config",
]
