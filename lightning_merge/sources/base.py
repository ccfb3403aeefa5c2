"""The lazy tensor-source interface and the in-memory sources (state dicts, live modules).

A :class:`Source` lists tensor names and reads one tensor at a time, so the engine never holds more
than one tensor per model. ``space`` (:mod:`lightning_merge.spaces`) says what ``get`` returns:

* ``"weight"``: the model's weight θ_t for that name, in its stored dtype, on CPU;
* ``"delta"``: the dense task vector δ_t (float32), e.g. ``scaling · B @ A`` of a LoRA adapter.
  Delta sources only list the tensors they change.

Key mapping lives here: :func:`align` renames a source's keys to the base model's naming by
stripping or adding the common wrapper prefixes (``model.``, ``module.``, PEFT's
``base_model.model.``, Lightning's ``_forward_module.``), picking the mapping that matches most keys.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import SourceError
from ..spaces import Space

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("model.", "module.", "_forward_module.", "base_model.model.", "_orig_mod.", "net.")


class Source(ABC):
    """A lazily read collection of named tensors."""

    space: Space = "weight"
    #: where the tensors come from, for messages (a path or "<state dict>")
    label: str = "<source>"
    #: folder with config/tokenizer files for HF outputs, if any
    config_dir: str | None = None
    #: True when ``get`` returns a new tensor on every call that nobody else holds (e.g. read from
    #: a file), so the engine may compute in place on it; False when it may return shared storage
    fresh_tensors: bool = False

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abstractmethod
    def dtype(self, key: str) -> torch.dtype: ...

    @abstractmethod
    def get(self, key: str) -> Tensor: ...

    def get_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` (along dim 0) of ``key``; sources that can read only those rows
        from disk override this (safetensors files, LoRA adapters)."""
        return self.get(key)[start:stop]

    def close(self) -> None:
        """Release file handles (idempotent)."""

    def validate_against(self, base: Source) -> None:
        """Raise :class:`SourceError` when this source cannot belong to ``base`` (delta sources)."""

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r})"


class StateDictSource(Source):
    """An in-memory mapping name -> tensor (a ``state_dict``), read without copying."""

    def __init__(self, tensors: Mapping[str, Tensor], label: str = "<state dict>", space: Space = "weight"):
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise SourceError(f"{label}: entries {bad[:5]} are not tensors; pass a flat name -> tensor mapping")
        self._t = dict(tensors)
        self.label = label
        self.space = space

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def get(self, key: str) -> Tensor:
        return self._t[key].detach()


class ModuleSource(StateDictSource):
    """A live ``nn.Module``: its parameters and buffers (tied parameters listed once).

    ``aliases`` maps each dropped duplicate name to the name kept (e.g. ``lm_head.weight`` ->
    ``model.embed_tokens.weight`` in a model with tied embeddings).
    """

    def __init__(self, module: nn.Module, label: str = "<module>"):
        seen: dict[int, str] = {}
        tensors: dict[str, Tensor] = {}
        self.aliases: dict[str, str] = {}
        for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False)
        ):
            key = id(t)
            if key in seen:
                self.aliases[name] = seen[key]
                continue
            seen[key] = name
            tensors[name] = t
        super().__init__(tensors, label=label)


class RenamedSource(Source):
    """A view of another source under different key names (``new -> old``)."""

    def __init__(self, inner: Source, mapping: Mapping[str, str]):
        self.inner = inner
        self.mapping = dict(mapping)
        self.space = inner.space
        self.fresh_tensors = inner.fresh_tensors
        self.label = inner.label
        self.config_dir = inner.config_dir

    def keys(self) -> list[str]:
        return list(self.mapping)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self.mapping[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.inner.dtype(self.mapping[key])

    def get(self, key: str) -> Tensor:
        return self.inner.get(self.mapping[key])

    def get_rows(self, key: str, start: int, stop: int) -> Tensor:
        return self.inner.get_rows(self.mapping[key], start, stop)

    def close(self) -> None:
        self.inner.close()

    def validate_against(self, base: Source) -> None:
        self.inner.validate_against(base)


def _candidate_maps(keys: Iterable[str]) -> list[dict[str, str]]:
    keys = list(keys)
    maps = [{k: k for k in keys}]
    for p in WRAPPER_PREFIXES:
        stripped = {k[len(p):]: k for k in keys if k.startswith(p)}
        if stripped:
            maps.append(stripped)
        maps.append({p + k: k for k in keys})
    # two levels (e.g. Lightning "model." around an HF "model." body is handled by one strip)
    return maps


def align(source: Source, reference_keys: Iterable[str]) -> Source:
    """Rename ``source``'s keys to best match ``reference_keys`` (see the module docstring).

    Raises :class:`SourceError` when no mapping shares a single key with the reference.
    """
    ref = set(reference_keys)
    own = source.keys()
    if set(own) <= ref:
        return source
    best, best_hits = None, -1
    for mapping in _candidate_maps(own):
        hits = len(ref.intersection(mapping))
        if hits > best_hits:
            best, best_hits = mapping, hits
    if best_hits <= 0:
        sample_own, sample_ref = sorted(own)[:3], sorted(ref)[:3]
        raise SourceError(
            f"{source.label}: none of its {len(own)} tensor names match the base model "
            f"(its names look like {sample_own}, the base's like {sample_ref}); "
            "is it a checkpoint of the same architecture?"
        )
    if best is not None and any(k != v for k, v in best.items()):
        log.debug("%s: keys renamed to match the base (%d of %d match)", source.label, best_hits, len(own))
        # keep unmatched keys under their own names so that nothing is silently lost
        for k in own:
            if k not in best.values():
                best.setdefault(k, k)
        return RenamedSource(source, best)
    return source
