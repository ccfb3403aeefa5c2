"""Where a tensor sits in a model, from its name alone: the layer stack and index, the module group.

One pattern serves everything that reads layer positions from names (mergekit gradients, the
applied-values summary, the missing-tensor warning): a name such as
``model.layers.5.mlp.up_proj.weight`` is layer 5 of the stack ``model.layers``, module group
``mlp``. No Lightning, no tensors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["LAYER_RE", "layer_of", "module_of", "tensor_groups"]

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
