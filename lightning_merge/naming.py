"""Where a tensor sits in a model, from its name alone: the layer stack and index, the module
group, and whether it is an embedding or an output head.

One home for everything that reads a model's structure from tensor names: mergekit gradients and
layer-range slices, the applied-values summary, the missing-tensor warning, Adaptive-RMS and DPPA
blocks, Sens-Merging layer groups, diagnostics, the vocabulary policies, tied heads, the PEFT
export of embeddings. A name such as ``model.layers.5.mlp.up_proj.weight`` is layer 5 of the stack
``model.layers``; ``model.embed_tokens.weight`` is an input embedding, ``lm_head.weight`` an output
head over the vocabulary. No Lightning, no tensors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["INPUT_EMBEDDINGS", "LAYER_RE", "OUTPUT_HEADS", "POSITION_EMBEDDINGS", "is_embedding_module",
           "is_input_embedding", "is_pre_layer", "is_tied_head", "is_vocab_tensor", "layer_of", "module_of",
           "tensor_groups", "tied_head_alias"]

#: ``<stack>.<index>`` where the stack's last component is a usual layer-list name
LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block))\.(\d+)(?:\.|$)")


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(stack, layer index, the rest of the name) of a tensor inside a layer stack, else None."""
    m = LAYER_RE.match(name)
    return (m.group(1), int(m.group(2)), name[m.end():]) if m else None


def module_of(name: str) -> str:
    """A tensor name without its ``.weight`` / ``.bias`` suffix."""
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


def tensor_groups(names: Sequence[str]) -> str:
    """A short description of where ``names`` lie: layer ranges per stack, then the other modules
    (``model.layers 1-2, 5; model.embed_tokens``)."""
    layers: dict[str, set[int]] = {}
    other: list[str] = []
    for n in names:
        hit = layer_of(n)
        if hit:
            layers.setdefault(hit[0], set()).add(hit[1])
        else:
            other.append(module_of(n))
    parts = []
    for stack, idx in layers.items():
        ranges: list[list[int]] = []
        for k in sorted(idx):
            if ranges and k == ranges[-1][-1] + 1:
                ranges[-1].append(k)
            else:
                ranges.append([k])
        parts.append(f"{stack} " + ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in ranges))
    other = list(dict.fromkeys(other))
    if other:
        parts.append(", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else ""))
    return "; ".join(parts)


# -------------------------------------------------------------------------------- embeddings, heads

#: module names of token embeddings (the input side of the vocabulary axis)
INPUT_EMBEDDINGS = frozenset({"embed_tokens", "embed", "wte", "word_embeddings", "embed_in", "tok_embeddings",
                              "shared"})
#: module names of output heads over the vocabulary (``lm_head`` / ``embed_out`` may be tied to the input)
OUTPUT_HEADS = frozenset({"lm_head", "embed_out", "output_layer", "vocab_projector", "predictions"})
#: embedding tables without a vocabulary axis (positions, token types)
POSITION_EMBEDDINGS = frozenset({"wpe", "position_embeddings", "token_type_embeddings", "embed_positions",
                                 "embeddings"})
_TIED = frozenset({"lm_head", "embed_out"})


def _modules(name: str) -> list[str]:
    parts = name.split(".")
    return parts[:-1] if parts[-1] in ("weight", "bias") else parts


def is_vocab_tensor(name: str) -> bool:
    """An input embedding or an output head (``*.weight`` / ``*.bias``), by name: the tensors whose
    first axis is the vocabulary (``model.embed_tokens.weight``, ``lm_head.weight``,
    ``transformer.wte.weight``, llama.cpp-style ``output.weight``, ``cls.predictions.bias``)."""
    parts = name.split(".")
    if parts[-1] not in ("weight", "bias"):
        return False
    mods = parts[:-1]
    return bool((INPUT_EMBEDDINGS | OUTPUT_HEADS).intersection(mods)) or mods in (["output"], ["model", "output"])


def is_input_embedding(name: str) -> bool:
    """The weight of a token embedding (``...embed_tokens.weight``, ``...wte.weight``, ...)."""
    return name.endswith(".weight") and _modules(name)[-1:] != [] and _modules(name)[-1] in INPUT_EMBEDDINGS


def is_tied_head(name: str) -> bool:
    """The weight of an output head that ``tie_word_embeddings`` ties to the input embedding."""
    return name.endswith(".weight") and bool(_modules(name)) and _modules(name)[-1] in _TIED


def is_embedding_module(module: str) -> bool:
    """A module name that is an embedding table (token, position or type embeddings)."""
    last = module.rsplit(".", 1)[-1]
    return last in INPUT_EMBEDDINGS or last in POSITION_EMBEDDINGS


def is_pre_layer(name: str) -> bool:
    """A tensor before the layer stack (the embeddings), as opposed to the final norm and head after it."""
    return any(m in INPUT_EMBEDDINGS or m in POSITION_EMBEDDINGS for m in _modules(name))


def tied_head_alias(keys: Sequence[str]) -> dict[str, str]:
    """``{"lm_head.weight": <the input embedding>}`` for a checkpoint that stores only the embedding
    of a model with tied word embeddings (empty when there is no single input embedding or the head is stored)."""
    if "lm_head.weight" in keys:
        return {}
    emb = [k for k in keys if is_input_embedding(k)]
    return {"lm_head.weight": emb[0]} if len(emb) == 1 else {}
