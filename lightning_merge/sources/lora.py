"""PEFT LoRA adapters as delta sources (spec §9.8): ``ΔW = scaling · B @ A``, materialized per tensor.

A :class:`LoraAdapterSource` reads an adapter folder written by PEFT's ``save_pretrained``
(``adapter_config.json`` + ``adapter_model.safetensors`` or ``adapter_model.bin``). Only the
headers are read when it is opened; ``get(name)`` reads that module's two factors and returns the
dense delta in float32, exactly as PEFT's ``get_delta_weight`` computes it:

* ``nn.Linear`` targets: ``transpose(B @ A, fan_in_fan_out) · scaling`` (``fan_in_fan_out`` is set
  for GPT-2-style ``Conv1D`` layers, whose weight is stored ``(in, out)``);
* ``nn.Embedding`` targets (``lora_embedding_A`` ``(r, num_embeddings)``, ``lora_embedding_B``
  ``(dim, r)``): ``(B @ A)ᵀ · scaling``;
* ``scaling = lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``, where ``r`` and
  ``lora_alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module
  name, using PEFT's own rule (``peft.utils.other.get_pattern_key``): the first pattern ``p`` (in
  the config's order) for which ``re.match(rf"(.*\\.)?({p})$", module_name)`` succeeds.

Names are the target weights in the base model's naming, without PEFT's ``base_model.model.``
wrapper, e.g. ``model.layers.0.self_attn.q_proj.weight``.

Refused with :class:`SourceError` (they are not a plain low-rank delta of existing weights):
non-LoRA PEFT types (IA3, LoHa, LoKr, AdaLoRA, ...), LoRA variants (DoRA ``use_dora``, QALoRA,
aLoRA, VeLoRA, BD-LoRA, MonteCLoRA, Arrow, KaSA), ``lora_bias``, ``target_parameters``,
``trainable_token_indices``, ``layer_replication``, adapters whose init changes the base weights
(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, unless converted with ``path_initial_model_for_weight_conversion``),
convolution LoRA, and any full tensor stored beside the factors (``modules_to_save``, trained
biases with ``bias != "none"``, resized embedding layers). Merge such an adapter into its base with
PEFT's ``merge_and_unload()`` and pass the resulting full model instead. The one full tensor kept
silently is ``<embedding>.base_layer.weight``, the frozen copy of a targeted embedding that PEFT
saves with ``save_embedding_layers``; it is ignored (its delta is the LoRA product).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import SourceError
from .base import RenamedSource, Source, align
from .files import SafetensorsFileSource, TorchFileSource

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

#: LoraConfig options that select a LoRA variant whose delta is not ``scaling · B @ A``
REFUSED_VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales each column of W + ΔW by a learned magnitude",
    "use_qalora": "QALoRA pools the input before lora_A",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after its invocation tokens",
    "velora_config": "VeLoRA changes the adapter's computation",
    "use_bdlora": "BD-LoRA stores block-diagonal factors",
    "monteclora_config": "MonteCLoRA samples its factors",
    "arrow_config": "Arrow routes between several LoRA experts",
    "kasa_config": "KaSA adds learned singular values",
    "lora_bias": "lora_bias trains a bias in lora_B, a full tensor beside the low-rank delta",
    "target_parameters": "target_parameters adapts nn.Parameters (e.g. MoE experts) through a wrapper",
    "trainable_token_indices": "trainable_token_indices trains selected embedding rows as full values",
    "layer_replication": "layer_replication duplicates layers, so its module names do not exist in the base",
}
#: init_lora_weights values that modify the base weights at initialization
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
    r"|lora_embedding_(?P<eab>[AB])(?:\.(?P<eadapter>[^.]+))?)$"
)


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first pattern matching ``module_name``, exactly as PEFT resolves
    ``rank_pattern`` / ``alpha_pattern`` (``peft.utils.other.get_pattern_key``): a pattern ``p``
    matches when ``re.match(rf"(.*\\.)?({p})$", module_name)`` does; else the exact name, else ``default``.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return patterns.get(module_name, default)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are and how its delta is formed."""

    module: str  #: module name in the base model (no ``base_model.model.``)
    layer: Literal["linear", "embedding"]
    a_key: str  #: key of A in the adapter file
    b_key: str  #: key of B in the adapter file
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    shape: tuple[int, ...]  #: shape of the delta (= the base weight's shape)


class LoraAdapterSource(Source):
    """A PEFT LoRA adapter folder as a lazy source of dense deltas (see the module docstring).

    Attributes:
        config: the parsed ``adapter_config.json``.
        base_model_name_or_path: the base model recorded by PEFT (may be ``None``).
        modules: target weight name -> :class:`LoraModule`.
    """

    fresh_tensors = True  # every delta is computed anew

    space = "delta"
    config_dir = None

    def __init__(self, path: PathLike, label: str | None = None):
        p = Path(path).expanduser()
        folder = p.parent if p.is_file() and p.name == ADAPTER_CONFIG else p
        if not folder.is_dir():
            raise SourceError(f"{p}: no such adapter folder; pass the folder PEFT's save_pretrained wrote")
        self.folder = folder
        self.label = label or str(folder)
        cfg_path = folder / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise SourceError(f"{folder}: has no {ADAPTER_CONFIG}; is it a PEFT adapter folder?")
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
            if not isinstance(self.config, dict):
                raise TypeError("not a JSON object")
        except (OSError, ValueError, TypeError) as e:
            raise SourceError(f"{cfg_path}: unreadable adapter config ({e}); re-save the adapter") from e
        self._check_config(cfg_path)
        self.base_model_name_or_path: str | None = self.config.get("base_model_name_or_path")

        weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            present = sorted(x.name for x in folder.iterdir())[:15]
            raise SourceError(
                f"{folder}: has no adapter weights; expected one of {list(ADAPTER_WEIGHTS)} "
                f"(the folder holds {present}); re-save the adapter with save_pretrained"
            )
        self.weights_file = weights
        self._file: Source = (
            SafetensorsFileSource(weights) if weights.suffix == ".safetensors" else TorchFileSource(weights)
        )
        self.modules: dict[str, LoraModule] = self._parse_keys()
        if not self.modules:
            raise SourceError(f"{weights}: holds no LoRA factors (lora_A / lora_B); is it a LoRA adapter?")
        log.debug("%s: LoRA adapter with %d target modules (base %s)",
                  self.label, len(self.modules), self.base_model_name_or_path)

    # ----------------------------------------------------------------------------------- parsing

    def _check_config(self, cfg_path: Path) -> None:
        cfg = self.config
        peft_type = cfg.get("peft_type")
        if peft_type is None:
            if "r" not in cfg or "lora_alpha" not in cfg:
                raise SourceError(
                    f"{cfg_path}: has no peft_type, r or lora_alpha; is it a PEFT LoRA adapter?"
                )
            log.warning("%s: no peft_type given; read as a LoRA adapter", cfg_path)
        elif str(peft_type).upper() != "LORA":
            raise SourceError(
                f"{cfg_path}: peft_type is {peft_type}; only plain LoRA adapters (peft_type LORA) can be "
                "read as deltas. Merge this adapter into its base with PEFT's merge_and_unload() and pass "
                "the resulting full model instead"
            )
        for option, why in REFUSED_VARIANTS.items():
            if cfg.get(option):
                raise SourceError(
                    f"{cfg_path}: sets {option}={cfg[option]!r}, which is not supported: {why}, so its "
                    "delta is not scaling * B @ A. Merge this adapter into its base with PEFT's "
                    "merge_and_unload() and pass the resulting full model instead"
                )
        init = str(cfg.get("init_lora_weights", "")).lower()
        if init.startswith(BASE_CHANGING_INITS):
            raise SourceError(
                f"{cfg_path}: init_lora_weights={cfg['init_lora_weights']!r} changes the base weights at "
                "initialization, so B @ A is not a delta of the original base. Convert it with PEFT's "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...) first"
            )
        for key in ("r", "lora_alpha"):
            if key in cfg and not isinstance(cfg[key], (int, float)):
                raise SourceError(f"{cfg_path}: {key}={cfg[key]!r} is not a number; fix the adapter config")
        for key in ("rank_pattern", "alpha_pattern"):
            pats = cfg.get(key) or {}
            if not isinstance(pats, dict):
                raise SourceError(f"{cfg_path}: {key} must be an object (pattern -> value), got {pats!r}")
            for pat in pats:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise SourceError(f"{cfg_path}: {key} entry '{pat}' is not a valid regex ({e})") from e

    def _parse_keys(self) -> dict[str, LoraModule]:
        cfg, f = self.config, self._file
        factors: dict[str, dict[str, str]] = {}
        layer_of: dict[str, str] = {}
        adapters: set[str] = set()
        full: list[str] = []
        base_layers: list[str] = []
        for key in f.keys():
            m = _FACTOR.match(key)
            if m is None:
                if key.endswith(".base_layer.weight"):
                    base_layers.append(key)
                else:
                    full.append(key)
                continue
            module = m["module"]
            if module.startswith(PEFT_PREFIX):
                module = module[len(PEFT_PREFIX):]
            ab = m["ab"] or m["eab"]
            adapter = m["adapter"] or m["eadapter"]
            if adapter:
                adapters.add(adapter)
            layer = "linear" if m["ab"] else "embedding"
            if layer_of.setdefault(module, layer) != layer:
                raise SourceError(
                    f"{self.weights_file}: module '{module}' has both lora_A/B and lora_embedding_A/B"
                )
            if ab in factors.setdefault(module, {}):
                raise SourceError(
                    f"{self.weights_file}: module '{module}' has two lora_{ab} tensors "
                    f"(adapters {sorted(adapters)}); save a single adapter per folder"
                )
            factors[module][ab] = key
        if "lora_magnitude_vector" in " ".join(full):
            raise SourceError(
                f"{self.weights_file}: holds DoRA magnitude vectors (lora_magnitude_vector); DoRA is not "
                "a plain low-rank delta. Merge it with PEFT's merge_and_unload() and pass the full model "
                "instead"
            )
        if full:
            hints = []
            if cfg.get("modules_to_save"):
                hints.append(f"modules_to_save={cfg['modules_to_save']}")
            if cfg.get("bias", "none") != "none":
                hints.append(f"bias={cfg['bias']!r}")
            why = f" (from {', '.join(hints)})" if hints else " (e.g. resized embedding layers)"
            raise SourceError(
                f"{self.weights_file}: holds full tensors beside the LoRA factors{why}, e.g. {full[:3]}; "
                "those are whole replacement weights, not low-rank deltas, and are not supported. Merge "
                "the adapter into its base with PEFT's merge_and_unload() and pass the resulting full "
                "model instead"
            )
        if len(adapters) > 1:
            raise SourceError(
                f"{self.weights_file}: holds several adapters {sorted(adapters)}; save one per folder"
            )
        if base_layers:
            log.debug("%s: ignoring %d saved base-layer copies (e.g. %s)",
                      self.label, len(base_layers), base_layers[0])

        r0 = cfg.get("r", 8)
        alpha0 = cfg.get("lora_alpha", 8)
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False))
        out: dict[str, LoraModule] = {}
        for module, ab in factors.items():
            if set(ab) != {"A", "B"}:
                lacking = "B" if "A" in ab else "A"
                raise SourceError(
                    f"{self.weights_file}: module '{module}' has no lora_{lacking} factor; the adapter "
                    "file is incomplete, re-save it"
                )
            layer = layer_of[module]
            a_shape, b_shape = f.shape(ab["A"]), f.shape(ab["B"])
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise SourceError(
                    f"{self.weights_file}: module '{module}' has factors of shapes {list(a_shape)} and "
                    f"{list(b_shape)}; only Linear, Conv1D and Embedding LoRA are supported "
                    "(not convolution LoRA)"
                )
            r = int(pattern_value(rank_pattern, module, r0))
            alpha = float(pattern_value(alpha_pattern, module, alpha0))
            if a_shape[0] != r or b_shape[1] != r:
                raise SourceError(
                    f"{self.weights_file}: module '{module}' has factors A {list(a_shape)} and "
                    f"B {list(b_shape)} but the config gives it rank r={r} (r / rank_pattern); the config "
                    "and the weights do not belong together"
                )
            if r <= 0:
                raise SourceError(f"{self.weights_file}: module '{module}' has rank {r}; r must be positive")
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            if layer == "embedding":
                shape: tuple[int, ...] = (a_shape[1], b_shape[0])
                flip = False
            else:
                flip = fifo
                shape = (a_shape[1], b_shape[0]) if flip else (b_shape[0], a_shape[1])
            out[f"{module}.weight"] = LoraModule(
                module, "embedding" if layer == "embedding" else "linear", ab["A"], ab["B"],
                r, alpha, scaling, flip, shape,
            )
        return out

    # --------------------------------------------------------------------------------- Source API

    def keys(self) -> list[str]:
        return list(self.modules)

    def __contains__(self, key: str) -> bool:
        return key in self.modules

    def _module(self, key: str) -> LoraModule:
        try:
            return self.modules[key]
        except KeyError:
            raise SourceError(
                f"{self.label}: the adapter does not change '{key}' (it targets {len(self.modules)} weights, "
                f"e.g. {self.keys()[:3]}); ask only for names listed by keys()"
            ) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._module(key).shape

    def dtype(self, key: str) -> torch.dtype:
        self._module(key)
        return torch.float32

    def get(self, key: str) -> Tensor:
        """The dense delta ``scaling · B @ A`` of ``key`` (transposed as PEFT does), float32 on CPU."""
        m = self._module(key)
        a = self._file.get(m.a_key).to(torch.float32)
        b = self._file.get(m.b_key).to(torch.float32)
        delta = b @ a
        if m.layer == "embedding" or m.fan_in_fan_out:
            delta = delta.T
        return (delta * m.scaling).contiguous()

    def get_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows of the dense delta from the rows of B only (``B[rows] @ A``) for linear layers."""
        m = self._module(key)
        if m.layer == "embedding" or m.fan_in_fan_out:
            return self.get(key)[start:stop]
        a = self._file.get(m.a_key).to(torch.float32)
        b = self._file.get_rows(m.b_key, start, stop).to(torch.float32)
        return ((b @ a) * m.scaling).contiguous()

    def close(self) -> None:
        self._file.close()

    def validate_against(self, base: Source) -> None:
        """Raise :class:`SourceError` ("adapter made for another base") unless every target weight
        exists in ``base`` with the delta's shape. Base names may carry wrapper prefixes (see ``align``).
        """
        base_keys = base.keys()
        name = self.base_model_name_or_path
        made_for = f" (it was made for {name!r})" if name else ""
        try:
            view = align(self, base_keys)
        except SourceError as e:
            raise SourceError(
                f"{self.label}: adapter made for another base{made_for}: none of its target weights "
                f"(e.g. {self.keys()[:2]}) exist in {base.label}"
            ) from e
        mapping = view.mapping if isinstance(view, RenamedSource) else {k: k for k in self.keys()}
        have = set(base_keys)
        for new, old in mapping.items():
            if new not in have:
                raise SourceError(
                    f"{self.label}: adapter made for another base{made_for}: it targets '{old}', which "
                    f"{base.label} does not have; pass the base model the adapter was trained on"
                )
            bshape, dshape = tuple(base.shape(new)), self.modules[old].shape
            if bshape != dshape:
                raise SourceError(
                    f"{self.label}: adapter made for another base{made_for}: module "
                    f"'{self.modules[old].module}' has a delta of shape {list(dshape)} (B @ A) but "
                    f"{base.label} has '{new}' of shape {list(bshape)}; pass the base model the adapter was "
                    "trained on"
                )
