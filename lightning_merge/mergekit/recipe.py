"""A parsed mergekit configuration, ready to run: :class:`MergeRecipe`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..methods.base import MergeMethod
from .settings import LayerIndex, MergekitTensorParams
from .tokenizer import TokenizerSpec

log = logging.getLogger(__name__)

__all__ = ["MergeRecipe", "tensor_names"]


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
        tokenizer: the tokenizer form (``tokenizer_source``, ``tokenizer``, ``chat_template``), or
            None: the base's tokenizer files are copied and resized embeddings truncated.
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
    tokenizer: TokenizerSpec | None = None

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
        """Run the merge with :func:`lightning_merge.api.merge_models` (CLI-level overrides win).

        With a tokenizer form the inputs are opened here and passed as views whose embeddings are
        in the output vocabulary, the output tokenizer built and checked before anything is
        written (:func:`~.tokenizer_build.tokenizer_sources`)."""
        from ..api import merge_models

        for note in self.notes:
            log.warning("%s", note)
        if self.tensor_params is not None:
            self.check_tensors(tensor_names(self.base if self.base is not None else self.experts[0]))

        def run(base: Any, experts: Sequence[Any]) -> Any:
            return merge_models(
                base, experts, self.method, weights=self.weights,
                seed=seed if seed is not None else (self.seed or 0), out=out, device=device,
                out_dtype=out_dtype if out_dtype is not None else self.out_dtype,
                tensor_params=self.tensor_params, overwrite=overwrite, progress=progress, **kwargs,
            )

        if self.tokenizer is None:
            return run(self.base, self.experts)
        from .tokenizer_build import tokenizer_sources

        donor = self.base if self.base is not None else self.experts[0]
        with tokenizer_sources(self.tokenizer, donor, self.experts) as (base, experts):
            return run(base, experts)


def tensor_names(spec: Any) -> list[str]:
    from ..sources.resolve import open_source

    src = open_source(spec)
    try:
        return list(src.keys())
    finally:
        src.close()


