"""Build the output tokenizer of a :class:`~.tokenizer.TokenizerSpec` and the merge's sources.

:func:`tokenizer_sources` (used by :meth:`~.recipe.MergeRecipe.merge`) opens the inputs, builds
the output tokenizer and the per-model permutations (:mod:`.tokenizer`'s rules), checks every
token setting, then stages a folder with the output tokenizer (``save_pretrained``, chat template
set) and the base's ``config.json`` with ``vocab_size`` set to the output vocabulary (padded to
``pad_to_multiple_of``), plus the base's other non-tokenizer files. The base's view takes that
folder as its ``config_dir``, so the HF writer copies the built tokenizer instead of the base's.
Everything that can fail on the inputs fails here, before the merge writes anything.

A model without tokenizer files is read with the base's vocabulary, with a warning (mergekit
does the same); the base (or a model named as ``tokenizer_source``) must have one. An adapter
expert (``BASE+ADAPTER``) has the base's vocabulary (mergekit reads the tokenizer of the model
part); one that changes the embeddings is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..naming import is_vocab_tensor
from ..sources.base import Source
from ..targets.hf import COPIED_FILES
from .refs import is_adapter
from .tokenizer import TokenizerSpec
from .vocabulary import PermutedSource, VocabularyAligner

log = logging.getLogger(__name__)

__all__ = ["TOKENIZER_FILES", "tokenizer_sources"]

#: files that make up a tokenizer (and its chat template); the staged folder has the built ones
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


def _config(folder: str | None) -> dict | None:
    if folder is None or not (Path(folder) / "config.json").is_file():
        return None
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _vocab_size(cfg: dict | None) -> int | None:
    """config.json ``vocab_size`` (or ``text_config.vocab_size``)."""
    for where in (cfg or {}, (cfg or {}).get("text_config") or {}):
        if isinstance(where, dict) and isinstance(where.get("vocab_size"), int):
            return int(where["vocab_size"])
    return None


def _load(path: str, key: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as err:  # noqa: BLE001 (transformers raises many types)
        raise ConfigError(f"{key}: cannot load the tokenizer of '{path}' ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); fix its tokenizer files") from None


def has_tokenizer(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                           "tokenizer.model"))


def _stripped(path: str, rows: int | None, key: str) -> Any:
    """The tokenizer of ``path`` without its tokens at ids ≥ ``rows`` (mergekit's
    ``get_stripped_tokenizer``: BPE tokenizers only)."""
    import tokenizers

    tok = _load(path, key)
    vocab = tok.get_vocab()
    rows = rows or len(vocab)
    unused = {t for t, i in vocab.items() if i >= rows}
    if not unused:
        return tok
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ConfigError(f"{key}: the tokenizer of '{path}' has {len(unused)} tokens at ids ≥ its vocab_size {rows} "
                          f"and is a {data['model']['type']} tokenizer; only BPE ones can be stripped (as mergekit)")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < rows]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base_tok: Any, toks: Sequence[tuple[Any, int]]) -> Any:
    """mergekit's ``build_union_tokenizer`` over ``(tokenizer, vocab_size)`` pairs, base first;
    vocabularies in id order."""
    from transformers import AutoTokenizer

    plain: dict[str, int] = {}
    added: dict[str, Any] = {}
    warned: set[str] = set()
    for tok, rows in toks:
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < rows:
                plain.setdefault(t, len(plain))
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i >= rows:
                continue
            if info.content not in added:
                added[info.content] = info
            elif added[info.content] != info and info.content not in warned:
                warned.add(info.content)
                log.warning("token %r is added with different settings by several models; using the first",
                            info.content)
    with tempfile.TemporaryDirectory(prefix="lightning_merge_tok_") as d:
        base_tok.save_pretrained(d)
        res = AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


class _Inputs:
    """Every input's source, tokenizer vocabulary and vocabulary size (rows)."""

    def __init__(self, spec: TokenizerSpec, sources: Mapping[str, Source]):
        self.base = spec.base_model if spec.base_model is not None else spec.inputs[0]
        self.sources = sources
        self.rows: dict[str, int | None] = {m: _vocab_size(_config(s.config_dir)) for m, s in sources.items()}
        base_dir = sources[self.base].config_dir
        if base_dir is None or not has_tokenizer(base_dir):
            what = "base_model" if spec.base_model is not None else "the first model (there is no base_model)"
            raise ConfigError(f"{spec.key}: {what} '{self.base}' has no tokenizer files (tokenizer.json / "
                              "tokenizer_config.json); add them to that folder, or remove the tokenizer keys to "
                              "merge without a tokenizer")
        self.base_tok = _stripped(base_dir, self.rows[self.base], spec.key)
        self.toks: dict[str, Any] = {self.base: self.base_tok}
        for m in spec.inputs:
            folder = sources[m].config_dir
            if m == self.base:
                continue
            if sources[m].space == "delta" or is_adapter(m):
                self.rows[m] = self.rows[self.base]
                continue  # an adapter's tokenizer is its base model's
            if folder is None or not has_tokenizer(folder):
                log.warning("%s: '%s' has no tokenizer files; it is read with the vocabulary of '%s' (as mergekit "
                            "does)", spec.key, m, self.base)
                continue
            self.toks[m] = _load(folder, spec.key)
        self.vocabs = {m: dict(t.get_vocab()) for m, t in self.toks.items()}

    def vocab(self, m: str) -> dict[str, int]:
        return self.vocabs.get(m, self.vocabs[self.base])

    def size(self, m: str) -> int:
        return self.rows[m] or len(self.vocab(m))

    def template(self, m: str) -> str | None:
        tok = self.toks.get(m, self.base_tok if (self.sources[m].space == "delta" or is_adapter(m)) else None)
        t = getattr(tok, "chat_template", None)
        if isinstance(t, dict):
            t = t.get("default")
        return t.strip() if t else None


def _output_tokenizer(spec: TokenizerSpec, inp: _Inputs) -> Any:
    if spec.source == "base":
        out = inp.base_tok
    elif spec.source == "union":
        order = [inp.base] + [m for m in spec.inputs if m in inp.toks and m != inp.base]
        out = _union(inp.base_tok, [(inp.toks[m], inp.rows[m] or inp.toks[m].vocab_size) for m in order])
    else:
        assert spec.source is not None
        if not has_tokenizer(spec.source):
            raise ConfigError(f"{spec.key}: '{spec.source}' has no tokenizer files (tokenizer.json / "
                              "tokenizer_config.json); name a model folder with a tokenizer, 'base' or 'union'")
        out = _load(spec.source, spec.key)
    vocab = set(out.get_vocab())
    for t in spec.tokens:
        if t not in vocab:
            out.add_tokens(t)
            vocab.add(t)
    return out


def _aligner(spec: TokenizerSpec, inp: _Inputs, tokenizer: Any) -> VocabularyAligner:
    vocab = tokenizer.get_vocab()
    n = len(vocab)
    tokens = [""] * n
    for t, i in vocab.items():
        if not 0 <= i < n or tokens[i]:
            raise ConfigError(f"{spec.key}: the output tokenizer's ids are not 0..{n - 1} (id {i} for {t!r}); "
                              "its vocabulary has holes, which mergekit cannot lay out as embedding rows either")
        tokens[i] = t
    perms: dict[str, torch.Tensor] = {}
    for m in spec.inputs:
        mv, rows = inp.vocab(m), inp.size(m)
        perms[m] = torch.tensor([j if (j := mv.get(t, -1)) < rows else -1 for t in tokens], dtype=torch.long)
    settings, original = {}, {}
    for t, s in spec.tokens.items():
        i = vocab[t]
        settings[i] = s
        if s.kind == "model" and int(perms[s.model][i]) < 0:
            raise ConfigError(f"{s.key}.source: '{s.model}' has no token {t!r}; take another model's row, or "
                              f"{{kind: model_token, model: {s.model}, token: SOME_TOKEN}}, or {{kind: zero}}")
        if s.kind == "model_token":
            assert s.model is not None
            row = s.token_id if s.token is None else inp.vocab(s.model).get(s.token)
            if row is None:
                raise ConfigError(f"{s.key}.source.token: {s.token!r} is not in the vocabulary of '{s.model}'")
            if not 0 <= row < inp.size(s.model):
                raise ConfigError(f"{s.key}.source.token_id: {row} is out of range for '{s.model}' "
                                  f"(vocab_size {inp.size(s.model)})")
            original[i] = {s.model: row}
    return VocabularyAligner(n, perms, settings, original, spec.base_model, spec.pad_to_multiple_of, tokens)


def _chat_template(spec: TokenizerSpec, inp: _Inputs | None, tokenizer: Any, sources: Mapping[str, Source],
                   base: str) -> None:
    text = spec.chat_template
    if text == "auto":
        order = ([spec.base_model] if spec.base_model else []) + [m for m in spec.inputs if m != spec.base_model]
        found = [t for m in order if (t := _template(m, inp, sources, base))]
        if not found:
            log.info("chat_template: auto found no chat template among the inputs; the tokenizer's own is kept")
            return
        text = Counter(found).most_common(1)[0][0]
        log.info("chat_template: auto selected %r", text[:80])
    if text:
        tokenizer.chat_template = text


def _template(m: str, inp: _Inputs | None, sources: Mapping[str, Source], base: str) -> str | None:
    if inp is not None:
        return inp.template(m)
    folder = sources[base if sources[m].space == "delta" or is_adapter(m) else m].config_dir
    if folder is None or not has_tokenizer(folder):
        return None
    t = getattr(_load(folder, "chat_template"), "chat_template", None)
    t = t.get("default") if isinstance(t, dict) else t
    return t.strip() if t else None


def _stage(folder: Path, base: Source, tokenizer: Any, vocab_rows: int | None) -> None:
    """The base's config.json (``vocab_size`` set) and non-tokenizer files, and ``tokenizer``."""
    src = None if base.config_dir is None else Path(base.config_dir)
    cfg = _config(base.config_dir)
    if cfg is not None:
        if vocab_rows is not None:
            where = cfg if "vocab_size" in cfg or not isinstance(cfg.get("text_config"), dict) else cfg["text_config"]
            where["vocab_size"] = vocab_rows
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if src is not None:
        for name in COPIED_FILES:
            if name not in TOKENIZER_FILES and (src / name).is_file():
                shutil.copy2(src / name, folder / name)
        if cfg is not None and cfg.get("auto_map"):
            for p in src.glob("*.py"):
                shutil.copy2(p, folder / p.name)
    tokenizer.save_pretrained(str(folder))
    lost = sorted(p.name for p in folder.iterdir() if p.name not in COPIED_FILES and p.name != "config.json"
                  and p.suffix != ".py")
    if lost:
        log.warning("the tokenizer's files %s are not among the files the HF writer copies; they are not written",
                    lost)


@contextmanager
def tokenizer_sources(
    spec: TokenizerSpec, base: str, experts: Sequence[str]
) -> Iterator[tuple[Source, list[Source]]]:
    """The base's and the experts' sources for :func:`~lightning_merge.api.merge_models`: views whose
    vocabulary tensors are in the output vocabulary, the base's ``config_dir`` a staged folder
    with the output tokenizer and config (see the module doc). Closes them on exit."""
    from ..sources.resolve import open_source

    sources: dict[str, Source] = {}
    try:
        for m in spec.inputs:
            sources[m] = open_source(m)
        base_key = spec.input_for(base)
        if spec.source is None:  # only a chat template: the base's tokenizer, re-saved
            folder = sources[base_key].config_dir
            if folder is None or not has_tokenizer(folder):
                raise ConfigError(f"chat_template: '{base_key}' has no tokenizer files to set the template on; add "
                                  "them, or remove chat_template")
            tokenizer, aligner, rows = _load(folder, "chat_template"), None, None
            _chat_template(spec, None, tokenizer, sources, base_key)
        else:
            inp = _Inputs(spec, sources)
            tokenizer = _output_tokenizer(spec, inp)
            aligner = _aligner(spec, inp, tokenizer)
            rows = aligner.rows_out
            for m, s in sources.items():
                names = {k for k in s.keys() if is_vocab_tensor(k)}
                if s.space == "delta":
                    if names:
                        raise ConfigError(f"{spec.key}: the adapter '{m}' changes {sorted(names)[:2]}, which a "
                                          "tokenizer form re-indexes; merge the adapter into its model first (peft "
                                          "merge_and_unload) and give that folder")
                    continue
                size = inp.size(m)
                aligner.add(m, s, {k for k in names if len(s.shape(k)) >= 1 and s.shape(k)[0] == size})
            _chat_template(spec, inp, tokenizer, sources, base_key)
        with tempfile.TemporaryDirectory(prefix="lightning_merge_tokenizer_") as stage:
            _stage(Path(stage), sources[base_key], tokenizer, rows)
            views = {m: PermutedSource(s, aligner, m) for m, s in sources.items()}
            base_view = PermutedSource(sources[base_key], aligner, base_key, config_dir=stage)
            yield base_view, [views[spec.input_for(e)] for e in experts]
    finally:
        for s in sources.values():
            s.close()
