"""The one word for "weights or deltas": a tensor's *space*.

* ``"weight"``: the model's weights θ (a full checkpoint holds them);
* ``"delta"``: a task vector δ = θ − θ₀ against the base θ₀ (a LoRA adapter holds ``scaling · B @ A``).

A merge method declares the space it works in (``MergeMethod.space``), a source the space its
tensors are in (``Source.space``), a plan the space it loads its inputs in (``MergePlan.space``:
the engine converts between the two with the base), and the search cache the space it keeps the
experts in. Nothing else names the concept.
"""

from __future__ import annotations

from typing import Literal

Space = Literal["weight", "delta"]

__all__ = ["Space"]
