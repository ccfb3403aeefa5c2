"""Loss functions of the learned merges (pure functions of logits and coefficients).

Logits are ``[B, C]`` (one prediction per example: sequence classifiers) or ``[B, S, V]`` (one per
token: language models; ``mask`` [B, S] marks the real tokens). A "token" below is one prediction.

* :func:`entropy` (AdaMerging): mean Shannon entropy H(p) = −Σ_v p_v log p_v of p = softmax(z)
  over the predictions.
* :func:`dam_kl` (DAM, spec §8.2): T² · Σ_tokens KL(softmax(z_e/T) ‖ softmax(z/T)), then
  ``"reference"`` ÷ B ÷ N_tok (the reference's double normalization: 'batchmean', then the
  number of non-pad tokens) or ``"per_token"`` ÷ N_tok (the mean per prediction).
* :func:`similarity_penalty`: Σ_layers mean_{a<b} cos(c_a, c_b) over the coefficient vectors of
  the models in each layer (eps 1e-8 in the norms), minimized to push the models apart.
* :func:`l1_penalty` Σ ‖c_m‖₁ and :func:`l2_penalty` Σ ‖c_m‖₂ (a norm, not squared), per model and
  coefficient tensor.
* :func:`task_loss`: the model's own loss when it returns one, else cross-entropy of the logits
  against ``labels`` (next-token shifted for ``[B, S, V]`` logits; label −100 is ignored).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

KLNormalization = Literal["reference", "per_token"]

__all__ = ["dam_kl", "entropy", "l1_penalty", "l2_penalty", "logits_of", "model_inputs", "similarity_penalty",
           "split_tasks", "task_loss", "token_mask"]


def logits_of(out: Any) -> Tensor:
    """The logits of a model output (``.logits``, a tensor, or the first element of a tuple)."""
    if isinstance(out, Tensor):
        return out
    z = getattr(out, "logits", None)
    if isinstance(z, Tensor):
        return z
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ConfigError(f"the model returned {type(out).__name__}, which has no logits; the learned merges need a "
                      "model whose output is logits or has a .logits attribute (a *ForCausalLM / "
                      "*ForSequenceClassification model)")


def token_mask(logits: Tensor, inputs: Mapping[str, Any]) -> Tensor | None:
    """The attention mask for per-token logits ``[B, S, V]``, else None (every prediction counts)."""
    mask = inputs.get("attention_mask")
    if logits.dim() == 3 and isinstance(mask, Tensor) and tuple(mask.shape) == tuple(logits.shape[:2]):
        return mask.bool()
    return None


def _up(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _masked_sum(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if mask is None:
        return x.sum(), torch.tensor(float(x.numel()), device=x.device)
    return (x * mask).sum(), mask.sum().to(x.dtype)


def entropy(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean entropy of softmax(logits) over the (unmasked) predictions."""
    logp = torch.log_softmax(_up(logits), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    total, count = _masked_sum(h, mask)
    return total / count.clamp_min(1)


def dam_kl(merged: Tensor, expert: Tensor, mask: Tensor | None = None, *, temperature: float = 2.0,
           normalization: KLNormalization = "reference") -> Tensor:
    """T² · Σ KL(softmax(expert/T) ‖ softmax(merged/T)), normalized as in the module doc."""
    t = float(temperature)
    logp = torch.log_softmax(_up(merged) / t, dim=-1)
    logq = torch.log_softmax(_up(expert) / t, dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    total, n_tok = _masked_sum(kl, mask)
    total = total * (t * t) / n_tok.clamp_min(1)
    return total / merged.shape[0] if normalization == "reference" else total


def similarity_penalty(vectors: Iterable[Tensor], eps: float = 1e-8) -> Tensor | None:
    """Σ over ``vectors`` ([models, size] each) of the mean pairwise cosine similarity of the rows."""
    total = None
    for c in vectors:
        m = c.shape[0]
        if m < 2:
            continue
        u = c / c.norm(dim=1, keepdim=True).clamp_min(eps)
        sims = u @ u.T
        iu = torch.triu_indices(m, m, offset=1, device=c.device)
        term = sims[iu[0], iu[1]].mean()
        total = term if total is None else total + term
    return total


def l1_penalty(coefficients: Iterable[Tensor]) -> Tensor | None:
    terms = [c.abs().sum() for c in coefficients]
    return torch.stack(terms).sum() if terms else None


def l2_penalty(coefficients: Iterable[Tensor]) -> Tensor | None:
    """Σ_m ‖c_m‖₂ over the rows (models) of every ``[models, ...]`` tensor."""
    terms = [c.reshape(c.shape[0], -1).norm(dim=1).sum() for c in coefficients]
    return torch.stack(terms).sum() if terms else None


def task_loss(out: Any, inputs: Mapping[str, Any]) -> Tensor:
    """The supervised loss of one batch (see the module doc)."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    z = logits_of(out)
    labels = inputs.get("labels")
    if labels is None and z.dim() == 3 and isinstance(inputs.get("input_ids"), Tensor):
        labels = inputs["input_ids"].clone()
        mask = token_mask(z, inputs)
        if mask is not None:
            labels[~mask] = -100
    if not isinstance(labels, Tensor):
        raise ConfigError("objective='task' needs labelled batches (a 'labels' entry) or a model that returns a loss")
    if z.dim() == 3:
        z, labels = z[:, :-1], labels[:, 1:]
    return F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def split_tasks(batch: Any) -> dict[str, Mapping[str, Any]]:
    """``{task: batch}`` of a per-task batch, or ``{"": batch}`` of a plain one."""
    if isinstance(batch, Mapping) and batch and all(isinstance(v, Mapping) for v in batch.values()):
        return dict(batch)
    if isinstance(batch, Mapping):
        return {"": batch}
    raise ConfigError(f"batches must be dicts of model inputs (input_ids, attention_mask, ...) or "
                      f"dicts {{task: batch}}, got {type(batch).__name__}")


def model_inputs(batch: Mapping[str, Any], *, labels: bool) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if labels or k != "labels"}
