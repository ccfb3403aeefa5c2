"""Export merged deltas as a PEFT LoRA adapter by truncated SVD.

For each module with merged dense delta ``ΔW = θ_merged − θ_base`` (``[out, in]``), the best rank-r
approximation in Frobenius norm (Eckart–Young) is ``U_r S_r V_rᵀ``. PEFT applies
``W + s · B @ A`` with ``s = lora_alpha / r``, so the factors are

    B = U_r · sqrt(S_r) / sqrt(s)      [out, r]
    A = sqrt(S_r) · V_rᵀ / sqrt(s)     [r, in]

(``sqrt(S)`` on both sides keeps the two factors on the same scale, which suits further training).
The reported error per module is ``‖ΔW − s·B@A‖_F / ‖ΔW‖_F``, computed from the factors actually
written; with an exact SVD it equals ``sqrt(Σ_{i>r} σ_i²) / sqrt(Σ_i σ_i²)``.

Embedding modules (names ending in ``embed_tokens``, ``wte``, ``wpe``, ``word_embeddings``,
``position_embeddings``, ``token_type_embeddings``, ``embed_in``, ``tok_embeddings``, ``shared``,
``embed_positions``) are stored as PEFT stores them: ``lora_embedding_A`` ``[r, num_embeddings]`` and
``lora_embedding_B`` ``[dim, r]``, with ``ΔW = s · (B @ A)ᵀ``. ``fan_in_fan_out=True`` does the same
transposition for GPT-2 style ``Conv1D`` weights stored ``[in, out]``.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import ConfigError, IncompatibleTensorError, MergeError
from ..naming import is_embedding_module
from .atomic import PathLike, atomic_output_dir, check_output_dir, writes

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SvdMethod = Literal["auto", "exact", "randomized"]
#: randomized SVD: extra columns and power iterations (Halko, Martinsson & Tropp 2011, §4.3-4.5)
OVERSAMPLE = 10
POWER_ITERATIONS = 4


class LoraExportReport(dict[str, float]):
    """Module name -> relative Frobenius reconstruction error, plus what was left out.

    ``skipped``: modules whose delta was all zero or below ``min_rel_change`` (nothing lost beyond
    that). ``unsupported``: weight names with non-zero deltas that a LoRA adapter cannot carry
    (not 2-D, e.g. norms and biases); applying the adapter does not reproduce those changes.
    """

    skipped: list[str]
    unsupported: list[str]
    path: Path | None
    #: module -> the smallest rank that brings its error under the warning threshold (modules
    #: above it only; a negative value -n means "at least n": the exact spectrum was not computed)
    needed_rank: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.skipped = []
        self.unsupported = []
        self.path = None
        self.needed_rank = {}


@dataclass
class _Factors:
    module: str
    a: Tensor
    b: Tensor
    rank: int
    norm: float
    error: float
    embedding: bool
    #: the smallest rank whose error is at most the warning threshold (None: already under it;
    #: negative: only a lower bound -n is known)
    needed: int | None = None


#: matrices up to this many elements get their exact spectrum (``svdvals``) when the rank that
#: meets the error threshold must be found beyond the randomized SVD's columns
EXACT_SPECTRUM_MAX = 1 << 24


def needed_rank(s: Tensor, norm: float, threshold: float) -> int | None:
    """The smallest r with ‖M − M_r‖_F / ‖M‖_F ≤ threshold, from M's singular values ``s``
    (descending; Eckart–Young: the error of the best rank-r approximation is √(Σ_{i>r} s_i²)).
    None when even the full given spectrum does not reach it (``s`` was truncated)."""
    if norm == 0:
        return 0
    energy = norm * norm
    tail = energy - torch.cumsum(s.double() ** 2, 0)  # error² after keeping 1, 2, ... values
    ok = torch.nonzero(tail.clamp_min(0).sqrt() / norm <= threshold)
    return int(ok[0]) + 1 if len(ok) else None


def _randomized_svd(m: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k SVD of ``m`` by a randomized range finder with power iterations (seeded, no global RNG)."""
    q = min(k + OVERSAMPLE, *m.shape)
    omega = torch.randn(m.shape[1], q, generator=generator, dtype=m.dtype)
    basis, _ = torch.linalg.qr(m @ omega)
    for _ in range(POWER_ITERATIONS):
        z, _ = torch.linalg.qr(m.T @ basis)
        basis, _ = torch.linalg.qr(m @ z)
    u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ u_small)[:, :k], s[:k], vh[:k]


def _use_randomized(svd: SvdMethod, shape: tuple[int, int], k: int) -> bool:
    if svd != "auto":
        return svd == "randomized"
    # exact SVD costs O(m·n·min(m, n)); the randomized one O(m·n·k·(2·iterations + 2)); it pays off
    # when k is well below min(m, n) and the matrix is large enough for the cost to matter
    return (k + OVERSAMPLE) * 4 <= min(shape) and shape[0] * shape[1] >= 1 << 20


def _factorize(
    name: str, module: str, delta: Tensor, rank: int, alpha: float, transpose: bool, svd: SvdMethod,
    embedding: bool, threshold: float,
) -> _Factors:
    mat = delta.T if transpose else delta  # PEFT's B @ A approximates this
    k = min(rank, *mat.shape)
    if k < rank:
        log.info("'%s': rank %d exceeds min(out, in) = %d; clamped to %d (rank_pattern)",
                 name, rank, min(mat.shape), k)
    scaling = alpha / k
    spectrum = None
    if _use_randomized(svd, tuple(mat.shape), k):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        u, s, vh = _randomized_svd(mat, k, gen)
    else:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        spectrum = s
        u, s, vh = u[:, :k], s[:k], vh[:k]
    root = s.sqrt()
    b = u * (root / math.sqrt(scaling))
    a = (root / math.sqrt(scaling))[:, None] * vh
    norm = float(torch.linalg.matrix_norm(mat))
    error = float(torch.linalg.matrix_norm(mat - scaling * (b @ a))) / norm
    needed = None
    if error > threshold:
        if spectrum is None and mat.numel() <= EXACT_SPECTRUM_MAX:
            spectrum = torch.linalg.svdvals(mat)
        needed = needed_rank(spectrum, norm, threshold) if spectrum is not None else None
        if needed is None:  # only the top k values are known: the rank needed is above k
            needed = -(k + 1)
    return _Factors(module, a.contiguous(), b.contiguous(), k, norm, error, embedding, needed)


def save_lora_adapter(
    deltas: Iterable[tuple[str, Tensor]],
    out_dir: PathLike,
    *,
    rank: int,
    alpha: float | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    min_rel_change: float = 0.0,
    svd: SvdMethod = "auto",
    fan_in_fan_out: bool = False,
    unsupported: Literal["warn", "error"] = "warn",
    inputs: Iterable[PathLike] = (),
    warn_error: float = 0.1,
) -> LoraExportReport:
    """Factorize merged dense deltas into a PEFT LoRA adapter folder; return the error per module.

    Args:
        deltas: ``(weight name, ΔW)`` pairs in base-model naming (``"model.layers.0.mlp.up_proj.weight"``),
            ``ΔW = merged − base``. 2-D ``.weight`` deltas become LoRA modules; all-zero deltas are
            skipped (debug log); other non-zero deltas cannot be carried by LoRA (see ``unsupported``).
        out_dir: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), written
            atomically (:func:`~lightning_merge.targets.atomic.atomic_output_dir`).
        rank: LoRA rank r. A module with ``min(out, in) < rank`` is clamped to ``min(out, in)`` (exact)
            and listed in the config's ``rank_pattern``.
        alpha: ``lora_alpha``; default ``rank``, so the scaling ``alpha / r`` is 1. The factors absorb
            the scaling, so any value reproduces the same ΔW.
        base_model_name_or_path: recorded in the config (PEFT uses it to find the base model).
        overwrite: replace an existing non-empty ``out_dir``.
        min_rel_change: leave out modules whose ``‖ΔW‖_F`` is below this fraction of the largest
            module's ``‖ΔW‖_F`` in the stream (0 keeps every non-zero delta). Relative to the largest
            delta, since the base weights are not passed here.
        svd: ``"exact"`` (``torch.linalg.svd`` in float32), ``"randomized"`` (seeded range finder
            with ``rank + 10`` columns and 4 power iterations: O(m·n·r) instead of O(m·n·min(m, n)),
            minutes instead of hours on a 7B model; its error is slightly above the optimum and is
            measured, not assumed) or ``"auto"`` (randomized when ``4·(rank + 10) ≤ min(m, n)`` and
            ``m·n ≥ 2²⁰``). ``torch.svd_lowrank`` is not used: it draws from the global RNG.
        fan_in_fan_out: weights are stored ``[in, out]`` (GPT-2 ``Conv1D``); written to the config.
        unsupported: ``"warn"`` (default): non-zero deltas that are not 2-D ``.weight`` matrices are
            left out with a warning and listed in the report's ``unsupported``; ``"error"``: raise
            :class:`~lightning_merge.errors.IncompatibleTensorError` instead (before writing).
        inputs: paths the output must not be, contain or lie inside (the merge's inputs).
        warn_error: modules whose relative error exceeds this get one warning, with the rank that
            would bring every one of them under it (Eckart–Young, from the exact spectrum; for
            matrices over :data:`EXACT_SPECTRUM_MAX` elements factorized by the randomized SVD only
            a lower bound is known). The per-module ranks are in the report's ``needed_rank``.

    Returns:
        :class:`LoraExportReport`: module name -> ``‖ΔW − s·B@A‖_F / ‖ΔW‖_F`` for every exported module,
        with ``.skipped`` and ``.unsupported`` lists.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank={rank!r} must be an int >= 1 (the LoRA rank r of the exported adapter)")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"alpha={alpha!r} must be a positive number (lora_alpha; scaling = alpha / rank)")
    if not 0.0 <= float(min_rel_change) < 1.0:
        raise ConfigError(f"min_rel_change={min_rel_change!r} must be in [0, 1): the fraction of the largest "
                          "module's delta norm below which a module is left out")
    if svd not in ("auto", "exact", "randomized"):
        raise ConfigError(f"svd={svd!r} is not one of ['auto', 'exact', 'randomized']")
    if unsupported not in ("warn", "error"):
        raise ConfigError(f"unsupported={unsupported!r} is not one of ['warn', 'error']")
    check_output_dir(out_dir, overwrite)

    report = LoraExportReport()
    factors: list[_Factors] = []
    seen: set[str] = set()
    for name, raw in deltas:
        if not isinstance(raw, Tensor):
            raise MergeError(f"delta '{name}' is a {type(raw).__name__}, not a tensor; "
                             "yield (name, Tensor) pairs")
        if name in seen:
            raise MergeError(f"delta '{name}' appears twice in the stream; each weight may be exported once")
        seen.add(name)
        delta = raw.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(delta).all()):
            raise IncompatibleTensorError(f"delta '{name}' contains NaN/Inf values; "
                                          "fix the merge before exporting")
        if not bool(delta.any()):
            log.debug("'%s': delta is all zero; no LoRA module", name)
            report.skipped.append(name)
            continue
        if delta.ndim != 2 or not name.endswith(".weight"):
            if unsupported == "error":
                raise IncompatibleTensorError(
                    f"delta '{name}' (shape {list(delta.shape)}) is non-zero but a LoRA adapter only carries "
                    "2-D '.weight' matrices; export a full model (save_hf_folder) or pass unsupported='warn'"
                )
            report.unsupported.append(name)
            continue
        module = name[: -len(".weight")]
        embedding = is_embedding_module(module)
        transpose = embedding or fan_in_fan_out
        factors.append(_factorize(name, module, delta, rank, alpha, transpose, svd, embedding, warn_error))
        del delta

    if report.unsupported:
        log.warning("%d non-zero deltas cannot be carried by a LoRA adapter and are left out (e.g. %s); "
                    "the adapter does not reproduce those changes", len(report.unsupported),
                    report.unsupported[:3])
    if factors and min_rel_change > 0:
        limit = min_rel_change * max(f.norm for f in factors)
        small = [f.module for f in factors if f.norm < limit]
        if small:
            log.info("%d modules changed by less than min_rel_change=%g of the largest delta; "
                     "left out (e.g. %s)", len(small), min_rel_change, small[:3])
            report.skipped.extend(f"{m}.weight" for m in small)
            factors = [f for f in factors if f.norm >= limit]
    if not factors:
        raise MergeError(f"no module has a non-zero 2-D delta to export to '{out_dir}'; "
                         "did the merge change any weight (compare against the right base)?")

    tensors: dict[str, Tensor] = {}
    for f in factors:
        key = PEFT_PREFIX + f.module
        if f.embedding:
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = f.a, f.b
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = f.a, f.b
        report[f.module] = f.error
        if f.needed is not None:
            report.needed_rank[f.module] = f.needed
        log.debug("'%s': rank %d, relative error %.3g", f.module, f.rank, f.error)

    from peft import LoraConfig  # deferred: peft pulls in transformers

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[f.module for f in factors],
        rank_pattern={f.module: f.rank for f in factors if f.rank != rank},
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model_name_or_path,
    )
    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs,
                           expected_bytes=sum(t.numel() * t.element_size() for t in tensors.values())) as tmp:
        with writes(tmp / ADAPTER_WEIGHTS):
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with writes(tmp):
            config.save_pretrained(str(tmp))
    worst = max(report, key=report.__getitem__)
    log.info("saved LoRA adapter '%s': %d modules at rank %d, relative error mean %.3g, max %.3g ('%s')",
             out_dir, len(report), rank, sum(report.values()) / len(report), report[worst], worst)
    if report.needed_rank:
        need = max(abs(v) for v in report.needed_rank.values())
        bound = any(v < 0 and abs(v) == need for v in report.needed_rank.values())
        log.warning(
            "LoRA adapter '%s': %d of %d modules reconstruct the merged delta with relative error above %g "
            "(max %.3g at '%s'); %s rank %d would bring every module under %g (adapter_rank / --adapter-rank; "
            "per module: the report's needed_rank)", out_dir, len(report.needed_rank), len(report), warn_error,
            report[worst], worst, "a" if not bound else "at least", need, warn_error)
    report.path = Path(out_dir)
    return report
