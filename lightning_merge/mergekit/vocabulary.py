"""Embedding rows permuted into the output vocabulary: mergekit 0.1.5's ``PermutedVocabulary``.

With a tokenizer form (``tokenizer_source`` / ``tokenizer``), every input's vocabulary tensors (the
input embedding and the LM head: mergekit's ``vocabulary_axis`` weights) are re-indexed from that
model's own token ids to the output tokenizer's before merging. :class:`VocabularyAligner` holds
the per-model permutations and computes the default rows; :class:`PermutedSource` is the view of a
:class:`~lightning_merge.sources.base.Source` whose vocabulary tensors come out already in the
output vocabulary (other tensors pass through unchanged).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..sources.base import Source

log = logging.getLogger(__name__)

__all__ = ["PermutedSource", "TokenSetting", "VocabularyAligner"]

@dataclass(frozen=True)
class TokenSetting:
    """One ``tokenizer.tokens`` entry: where a token's row comes from, and ``force``.

    ``kind``: ``"auto"`` (no ``source``: the automatic rule below), ``"model"`` (that model's row
    for the same token), ``"model_token"`` (that model's row ``token_id``, or the row of ``token``
    in its own vocabulary) or ``"zero"``.
    """

    kind: Literal["auto", "model", "model_token", "zero"] = "auto"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False
    key: str = "tokenizer.tokens"


class VocabularyAligner:
    """Per-model permutations into the output vocabulary, and the rows models lack.

    ``perms[m][i]`` is model ``m``'s row for output token ``i`` (−1: ``m`` lacks that token). For a
    vocabulary tensor, the models that have it are the participants; model ``m``'s output row ``i`` is

    * its own row ``perms[m][i]`` when it has the token and the token is not ``force``d;
    * otherwise the token's default row: from its ``tokens`` setting when it has a source (``zero``;
      ``model``: that model's row for the token; ``model_token``: that model's row ``token_id``, or
      the row of ``token`` in its own vocabulary); else (no setting, or one without source) the
      one participant's row when only one has the token, zeros when none has it (a warning), the
      base model's row when the YAML names a ``base_model`` that has it, else the mean of the
      participants' rows (in input order);
    * rows past the vocabulary (``pad_to_multiple_of``) are the mean of the model's first
      ``len(vocab)`` output rows.

    This is mergekit 0.1.5's ``PermutedVocabulary`` (``assign_embedding_sources``,
    ``compute_default_embedding``), except that a setting without ``source`` follows the automatic
    rule (mergekit raises NotImplementedError when it is needed) and a token whose id lies past a
    model's vocabulary size counts as missing (mergekit raises KeyError). Arithmetic is float32;
    each tensor comes out in its input dtype.
    """

    def __init__(
        self,
        vocab_size: int,
        perms: Mapping[str, Tensor],
        settings: Mapping[int, TokenSetting],
        original_ids: Mapping[int, Mapping[str, int]],
        base_model: str | None,
        pad_to_multiple_of: int | None,
        tokens: Sequence[str],
    ):
        self.vocab_size = vocab_size
        self.rows_out = vocab_size
        if pad_to_multiple_of and vocab_size % pad_to_multiple_of:
            self.rows_out = (vocab_size // pad_to_multiple_of + 1) * pad_to_multiple_of
        self.perms = dict(perms)
        self.settings = dict(settings)
        self.original_ids = original_ids  # output id -> {model: its row} for "model_token" settings
        self.base_model = base_model
        self.tokens = list(tokens)
        self.order: list[str] = list(perms)
        self.sources: dict[str, Source] = {}
        self.names: dict[str, set[str]] = {}
        self.forced = torch.zeros(vocab_size, dtype=torch.bool)
        for i, s in self.settings.items():
            self.forced[i] = s.force
        self._defaults: dict[str, tuple[Tensor, Tensor]] = {}
        self._lock = threading.Lock()

    def add(self, model: str, source: Source, names: set[str]) -> None:
        """Register ``model``'s source and its vocabulary tensor names."""
        self.sources[model] = source
        self.names[model] = set(names)

    def participants(self, name: str) -> list[str]:
        return [m for m in self.order if name in self.names.get(m, ())]

    def defaults(self, name: str) -> tuple[Tensor, Tensor]:
        """(output ids, their default rows) for tensor ``name``: tokens some participant lacks or
        that are forced. Computed once per name (reads every participant's tensor once)."""
        with self._lock:
            if name not in self._defaults:
                self._defaults[name] = self._compute_defaults(name)
            return self._defaults[name]

    def _compute_defaults(self, name: str) -> tuple[Tensor, Tensor]:
        models = self.participants(name)
        perm = torch.stack([self.perms[m] for m in models])
        present = perm >= 0
        count = present.sum(0)
        need = (count < len(models)) | self.forced
        ids = need.nonzero().flatten()
        if ids.numel() == 0:
            return ids, torch.empty(0)
        tensors = {m: self.sources[m].get(name).to(torch.float32) for m in models}
        rest = tensors[models[0]].shape[1:]
        rows = torch.zeros((ids.numel(), *rest), dtype=torch.float32)
        base = self.base_model if self.base_model in models else None
        for j, i in enumerate(ids.tolist()):
            s = self.settings.get(i)
            if s is not None and s.kind != "auto":
                rows[j] = self._configured(s, i, tensors, rest)
            elif int(count[i]) == 1:
                donor = models[int(present[:, i].nonzero()[0, 0])]
                rows[j] = tensors[donor][int(self.perms[donor][i])]
            elif int(count[i]) == 0:
                log.warning("token %r is in no model's vocabulary: its '%s' row is zero", self.tokens[i], name)
            elif base is not None and int(self.perms[base][i]) >= 0:
                rows[j] = tensors[base][int(self.perms[base][i])]
            else:
                acc = torch.zeros(rest, dtype=torch.float32)
                for k, m in enumerate(models):
                    if present[k, i]:
                        acc = acc + tensors[m][int(self.perms[m][i])]
                rows[j] = acc / int(count[i])
        return ids, rows

    def _configured(self, s: TokenSetting, i: int, tensors: Mapping[str, Tensor], rest: torch.Size) -> Tensor:
        if s.kind == "zero":
            return torch.zeros(rest, dtype=torch.float32)
        assert s.model is not None
        if s.model not in tensors:
            raise ConfigError(f"{s.key}.source: '{s.model}' has no tensor of this vocabulary weight; name a model "
                              "that has the embeddings, or use {kind: zero}")
        row = int(self.perms[s.model][i]) if s.kind == "model" else self.original_ids[i][s.model]
        return tensors[s.model][row]

    def permuted(self, model: str, name: str, old: Tensor) -> Tensor:
        """``old`` (model ``model``'s tensor ``name``, rows in its own token ids) in the output
        vocabulary: ``rows_out`` rows, dtype of ``old``."""
        ids, rows = self.defaults(name)
        p = self.perms[model]
        src = old.to(torch.float32)
        out = torch.zeros((self.rows_out, *src.shape[1:]), dtype=torch.float32)
        take = (p >= 0) & ~self.forced
        idx = take.nonzero().flatten()
        out[idx] = src[p[idx]]
        if ids.numel():
            fill = ~take[ids]
            out[ids[fill]] = rows[fill]
        if self.rows_out > self.vocab_size:
            out[self.vocab_size:] = out[: self.vocab_size].mean(0)
        return out.to(old.dtype)


class PermutedSource(Source):
    """A view of ``inner`` (model ``model`` of ``aligner``) whose vocabulary tensors come out in the
    output vocabulary (``aligner.rows_out`` rows); ``config_dir`` replaces the inner one when given
    (the staged folder with the output tokenizer and config)."""

    def __init__(self, inner: Source, aligner: VocabularyAligner | None, model: str, config_dir: str | None = None):
        self.inner = inner
        self.aligner = aligner
        self.model = model
        self.space = inner.space
        self.fresh_tensors = inner.fresh_tensors
        self.label = inner.label
        self.config_dir = config_dir if config_dir is not None else inner.config_dir
        self.vocab = set() if aligner is None else aligner.names.get(model, set())
        if hasattr(inner, "aliases"):
            self.aliases = inner.aliases

    def keys(self) -> list[str]:
        return self.inner.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        shape = tuple(self.inner.shape(key))
        if key in self.vocab:
            assert self.aligner is not None
            return (self.aligner.rows_out, *shape[1:])
        return shape

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(key)

    def get(self, key: str) -> Tensor:
        if key in self.vocab:
            assert self.aligner is not None
            return self.aligner.permuted(self.model, key, self.inner.get(key))
        return self.inner.get(key)

    def get_rows(self, key: str, start: int, stop: int) -> Tensor:
        if key in self.vocab:
            return self.get(key)[start:stop]
        return self.inner.get_rows(key, start, stop)

    def close(self) -> None:
        self.inner.close()

    def validate_against(self, base: Source) -> None:
        self.inner.validate_against(base)
