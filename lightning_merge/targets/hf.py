"""Write merged tensors as a Hugging Face model folder: safetensors shards, config and tokenizer.

The folder is built inside :func:`~lightning_merge.targets.atomic.atomic_output_dir` by the
streamed shard writer (:func:`~lightning_merge.targets.shards.save_safetensors_shards`), so it
appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError
from ..naming import is_input_embedding, is_tied_head
from .atomic import PathLike, atomic_output_dir, check_output_dir, writes
from .shards import DEFAULT_MAX_SHARD_BYTES, Layout, TensorStream, _nbytes_of, save_safetensors_shards

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
#: copied from ``config_dir`` when present (config.json is copied separately, with its dtype updated)
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)

def _fingerprint(t: Tensor) -> tuple[tuple[int, ...], torch.dtype, str]:
    """Shape, dtype and a hash of the bytes: equality of tensors without keeping them in memory."""
    flat = t.reshape(-1).view(torch.uint8).numpy()
    return tuple(t.shape), t.dtype, hashlib.blake2b(flat.data, digest_size=16).hexdigest()


class _HfStream:
    """Wrap the stream for an HF folder: drop a tied output head equal to the input embedding,
    and count floating dtypes for the config's ``dtype`` field.

    With ``tie_word_embeddings`` true, ``save_pretrained`` writes only the input embedding. A head
    (``lm_head.weight`` / ``embed_out.weight``) whose bytes equal an input embedding seen in the stream
    (``embed_tokens``, ``wte``, ``word_embeddings``, ``embed_in``, ``tok_embeddings``, ``shared``) is
    dropped likewise. A head that differs (e.g. a random-drop merge drew other masks for the two
    names) is written, and the config is untied so that transformers loads it instead of silently
    re-tying it. A head that comes before any embedding is held back until the end of the stream.
    """

    def __init__(self, tensors: TensorStream, tied: bool):
        self.tensors = tensors
        self.tied = tied
        self.untie = False
        self.dtype_numel: Counter[torch.dtype] = Counter()
        self._embeds: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {}

    def _head_matches(self, name: str, t: Tensor) -> bool | None:
        """True/False: equals/differs from a seen embedding of its shape; None: none seen yet."""
        fp = _fingerprint(t)
        same_shape = [k for k, v in self._embeds.items() if v[:2] == fp[:2]]
        if not same_shape:
            return None
        if any(self._embeds[k] == fp for k in same_shape):
            log.debug("'%s' equals the tied input embedding %s: not written (as save_pretrained)", name,
                      same_shape)
            return True
        log.warning("the config ties '%s' to %s, but the merged values differ; writing both and setting "
                    "tie_word_embeddings=false in the written config", name, same_shape)
        self.untie = True
        return False

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        held: list[tuple[str, Tensor]] = []
        for name, t in self.tensors:
            if self.tied and isinstance(t, Tensor):
                t = t.detach().to("cpu").contiguous()
                if is_input_embedding(name):
                    self._embeds[name] = _fingerprint(t)
                elif is_tied_head(name):
                    match = self._head_matches(name, t)
                    if match is None:
                        held.append((name, t))
                        continue
                    if match:
                        continue
            yield self._count(name, t)
        for name, t in held:
            if self._head_matches(name, t) is not True:
                yield self._count(name, t)

    def _count(self, name: str, t: Tensor) -> tuple[str, Tensor]:
        if isinstance(t, Tensor) and t.dtype.is_floating_point:
            self.dtype_numel[t.dtype] += t.numel()
        return name, t


def _set_dtype(config: dict, dtype: torch.dtype) -> None:
    """Set ``dtype``/``torch_dtype`` wherever the config (or a nested sub-config) has one."""
    value = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config and config[key] is not None:
            config[key] = value
    for v in config.values():
        if isinstance(v, dict):
            _set_dtype(v, dtype)


def _read_config(config_dir: Path | None) -> dict | None:
    if config_dir is None:
        return None
    if not config_dir.is_dir():
        raise ConfigError(f"config_dir '{config_dir}' is not a directory; pass the folder holding the base "
                          "model's config.json and tokenizer files (or config_dir=None)")
    path = config_dir / CONFIG_FILE
    if not path.is_file():
        log.warning("config_dir '%s' has no config.json: the output will not load with from_pretrained "
                    "until one is added", config_dir)
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"'{path}' is not readable JSON ({err}); fix or replace that config.json") from err
    if not isinstance(config, dict):
        raise ConfigError(f"'{path}' holds a JSON {type(config).__name__}, not an object; "
                          "is it a model config?")
    return config


def save_hf_folder(
    tensors: TensorStream,
    out_dir: PathLike,
    *,
    config_dir: PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    layout: Layout | None = None,
    config_updates: dict | None = None,
    inputs: Iterable[PathLike] = (),
    finish: Callable[[Path], object] | None = None,
) -> Path:
    """Write a Hugging Face model folder (shards + config + tokenizer) atomically; return its path.

    ``finish(folder)``, when given, adds files of its own to the temporary folder before it is
    renamed into place (so they appear with the model, or not at all).

    ``config_updates`` are set in the copied config.json (e.g. ``vocab_size`` after a merge that
    padded the embeddings to a larger vocabulary).

    ``layout`` (the stream's (name, shape, dtype) in order) lets the shards be written as the
    tensors arrive, with no buffering; it is ignored when the config ties an output head that the
    stream carries (that head may have to be dropped, see :class:`_HfStream`).

    Tensors are streamed into shards (:func:`save_safetensors_shards`) inside a temporary sibling
    folder that becomes ``out_dir`` only when everything is written (:func:`atomic_output_dir`).
    From ``config_dir`` (typically the base model's folder) ``config.json`` is copied with its
    ``dtype``/``torch_dtype`` field (where present) set to the dtype of the written floating tensors
    (the most common one by element count), and the generation config, tokenizer and chat-template
    files in :data:`COPIED_FILES` are copied where they exist (plus ``*.py`` when the config has an
    ``auto_map``, for ``trust_remote_code`` models). Tied embeddings are handled as described in
    :class:`_HfStream`.

    Raises :class:`OutputExistsError` before reading the stream if ``out_dir`` is a non-empty
    directory and ``overwrite`` is false, and :class:`~lightning_merge.errors.OutputError` if it is,
    contains or lies inside one of ``inputs`` (the merge's input paths), or if the free space is
    below the size that ``layout`` implies.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    cfg_dir = None if config_dir is None else Path(config_dir)
    config = _read_config(cfg_dir)
    if config is not None and config_updates:
        config.update(config_updates)
    tied = bool(config and config.get("tie_word_embeddings", False))
    expected = None if layout is None else sum(_nbytes_of(shape, dtype) for _, shape, dtype in layout)
    stream = _HfStream(tensors, tied=tied)
    if layout is not None and tied and any(is_tied_head(name) for name, _, _ in layout):
        layout = None
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs, expected_bytes=expected) as tmp:
        save_safetensors_shards(stream, tmp, max_shard_bytes=max_shard_bytes, metadata=metadata, layout=layout)
        if config is not None:
            if stream.dtype_numel:
                ranked = stream.dtype_numel.most_common()
                if len(ranked) > 1:
                    log.info("the output mixes floating dtypes %s; config dtype set to the most common",
                             {str(k): v for k, v in ranked})
                _set_dtype(config, ranked[0][0])
            if stream.untie:
                config["tie_word_embeddings"] = False
            with writes(tmp / CONFIG_FILE):
                (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if cfg_dir is not None:
            copied = [n for n in COPIED_FILES if (cfg_dir / n).is_file()]
            if config is not None and config.get("auto_map"):
                copied += [p.name for p in sorted(cfg_dir.glob("*.py"))]
            for n in copied:
                with writes(tmp / n):
                    shutil.copy2(cfg_dir / n, tmp / n)
            log.debug("copied %s from '%s'", copied, cfg_dir)
        if finish is not None:
            finish(tmp)
    log.debug("saved Hugging Face folder '%s'", out)
    return out
