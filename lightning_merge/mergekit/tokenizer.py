"""mergekit's tokenizer forms: ``tokenizer_source``, ``tokenizer:`` and ``chat_template``.

Parsing (this module, no files read but mergekit's built-in chat templates) gives a
:class:`TokenizerSpec`; :mod:`.tokenizer_build` builds the output tokenizer and the per-model
permutations at merge time, and :mod:`.vocabulary` re-indexes the embedding rows.

The output tokenizer, as mergekit 0.1.5 builds it (``tokenizer.build.build_tokenizer``):

* ``base``: the base model's tokenizer (``base_model``, else the first model), with the tokens at
  ids ≥ its config ``vocab_size`` removed (BPE tokenizers only, as mergekit);
* ``union``: the base's tokenizer plus, model by model, every token of the others' vocabularies
  (ids < their ``vocab_size``) it lacks, plain tokens first, then the added tokens with their
  settings (the first model's when they differ). We take the models in YAML order (base first)
  and each vocabulary in id order; mergekit takes them in Python-set and hash-map order, so its
  ids for tokens new to the base can vary from run to run when several models or several plain
  tokens contribute;
* a model path: that model's tokenizer, as saved;
* then every ``tokenizer.tokens`` key it lacks is added as a plain token, in YAML order.

``chat_template``: a built-in name (mergekit's ``_data/chat_templates``: ``chatml``, ``llama3``,
... read from the installed mergekit package), ``auto`` (the most common chat template among the
inputs' tokenizers, base first, then YAML order; none found: the tokenizer's own) or a literal
Jinja template (at least 20 characters, with a ``{``). It is set on the output tokenizer, or with
no tokenizer form on the base's tokenizer re-saved (``save_pretrained``), as mergekit does.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .refs import PathResolver, model_ref, split_ref
from .vocabulary import TokenSetting

log = logging.getLogger(__name__)

__all__ = ["TokenSetting", "TokenizerSpec", "builtin_chat_templates", "chat_template_text", "parse_tokenizer"]


@dataclass(frozen=True)
class TokenizerSpec:
    """A parsed tokenizer form.

    Attributes:
        source: ``"base"``, ``"union"``, a model path, or None (no tokenizer form: only a chat
            template on the base's tokenizer).
        key: the YAML key of ``source``, for messages.
        tokens: ``tokenizer.tokens``, token -> setting, in YAML order.
        pad_to_multiple_of: pad the vocabulary (rows and ``vocab_size``) to a multiple of this.
        chat_template: the template text, ``"auto"``, or None.
        base_model: the YAML ``base_model`` (None when absent).
        inputs: the merged models in mergekit's order: ``models`` as listed, then ``base_model``
            when it is not listed.
    """

    source: str | None
    key: str = "tokenizer_source"
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None
    base_model: str | None = None
    inputs: tuple[str, ...] = ()

    def input_for(self, path: str) -> str:
        """The entry of ``inputs`` that names the same model as ``path``."""
        for p in self.inputs:
            if PathResolver.same(p, path):
                return p
        raise ConfigError(f"{self.key}: '{path}' is not one of the merged models {list(self.inputs)}")


def parse_tokenizer(
    cfg: Mapping[str, Any], paths: PathResolver, base_ref: str | None, entries: Sequence[str],
) -> TokenizerSpec | None:
    """The tokenizer form of a config (None: none given, the base's tokenizer files are copied).

    ``entries`` are the ``models:`` paths as resolved by the parser (an adapter's path for
    ``BASE+ADAPTER``). Raises :class:`ConfigError` naming the key and the fix."""
    ts, tok, chat = cfg.get("tokenizer_source"), cfg.get("tokenizer"), cfg.get("chat_template")
    if ts is not None and tok is not None:
        raise ConfigError("tokenizer_source: give either 'tokenizer_source' or 'tokenizer', not both (mergekit "
                          "refuses both); e.g. 'tokenizer: {source: union, tokens: ...}'")
    inputs = [base_ref if base_ref is not None and PathResolver.same(p, base_ref) else p for p in entries]
    if base_ref is not None and base_ref not in inputs:
        inputs.append(base_ref)
    text = chat_template_text(chat)
    if ts is None and tok is None:
        if text is None:
            return None
        return TokenizerSpec(None, "chat_template", chat_template=text, base_model=base_ref, inputs=tuple(inputs))
    if ts is not None:
        source, key, tokens, pad = ts, "tokenizer_source", {}, None
    else:
        if not isinstance(tok, Mapping):
            raise ConfigError("tokenizer: expected a mapping like {source: union, tokens: {...}, "
                              "pad_to_multiple_of: 64}")
        extra = sorted(set(tok) - {"source", "tokens", "pad_to_multiple_of"})
        if extra:
            raise ConfigError(f"tokenizer.{extra[0]}: unknown key; 'tokenizer' has source, tokens, "
                              "pad_to_multiple_of")
        source, key = tok.get("source", "union"), "tokenizer.source"
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise ConfigError(f"tokenizer.pad_to_multiple_of: expected a positive integer (e.g. 64), got {pad!r}")
        tokens = _tokens(tok.get("tokens"), paths, inputs)
    if source not in ("base", "union"):
        source = _model_path(source, key, paths)
    return TokenizerSpec(source, key, tokens, pad, text, base_ref, tuple(inputs))


def _model_path(value: Any, key: str, paths: PathResolver) -> str:
    if not isinstance(value, (str, Mapping)):
        raise ConfigError(f"{key}: expected 'base', 'union' or a model path, got {value!r}")
    raw, lora = model_ref(value, key)
    path, _adapter = split_ref(raw, lora, key, paths)  # mergekit reads the tokenizer of the model part
    return path


def _tokens(value: Any, paths: PathResolver, inputs: Sequence[str]) -> dict[str, TokenSetting]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError("tokenizer.tokens: expected a mapping token -> {source: ..., force: ...}")
    out: dict[str, TokenSetting] = {}
    for token, entry in value.items():
        key = f"tokenizer.tokens.{token}"
        if not isinstance(token, str) or not token:
            raise ConfigError(f"tokenizer.tokens: token {token!r} is not a non-empty string; quote it in the YAML")
        if entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key}: expected a mapping with 'source' and/or 'force', got {entry!r}")
        extra = sorted(set(entry) - {"source", "force"})
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: unknown key; a token has 'source' and 'force'")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{key}.force: expected true or false, got {force!r}")
        out[token] = _token_source(entry.get("source"), force, key, paths, inputs)
    return out


def _token_source(src: Any, force: bool, key: str, paths: PathResolver, inputs: Sequence[str]) -> TokenSetting:
    if src is None:
        return TokenSetting("auto", force=force, key=key)
    if isinstance(src, Mapping) and "kind" in src:
        kind = src["kind"]
        if kind == "zero":
            if set(src) != {"kind"}:
                raise ConfigError(f"{key}.source: {{kind: zero}} takes no other key, got {sorted(src)}")
            return TokenSetting("zero", force=force, key=key)
        if kind != "model_token":
            raise ConfigError(f"{key}.source.kind: {kind!r} is not 'model_token' or 'zero'")
        extra = sorted(set(src) - {"kind", "model", "token", "token_id"})
        if extra:
            raise ConfigError(f"{key}.source.{extra[0]}: unknown key; model_token has model and token or token_id")
        token, token_id = src.get("token"), src.get("token_id")
        if (token is None) == (token_id is None):
            raise ConfigError(f"{key}.source: model_token needs exactly one of 'token' and 'token_id'")
        if token is not None and not isinstance(token, str):
            raise ConfigError(f"{key}.source.token: expected a string, got {token!r}")
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
            raise ConfigError(f"{key}.source.token_id: expected a non-negative integer, got {token_id!r}")
        if "model" not in src:
            raise ConfigError(f"{key}.source: model_token needs 'model' (one of the merged models)")
        model = _merged_model(src["model"], f"{key}.source.model", paths, inputs)
        return TokenSetting("model_token", model, token, token_id, force, key)
    return TokenSetting("model", _merged_model(src, f"{key}.source", paths, inputs), force=force, key=key)


def _merged_model(value: Any, key: str, paths: PathResolver, inputs: Sequence[str]) -> str:
    if not isinstance(value, (str, Mapping)):
        raise ConfigError(f"{key}: expected a model path, {{kind: model_token, ...}} or {{kind: zero}}, got {value!r}")
    raw, lora = model_ref(value, key)
    path, adapter = split_ref(raw, lora, key, paths)
    if adapter is not None:
        raise ConfigError(f"{key}: '{raw}+{adapter}' is an adapter, whose embeddings are the base's; name the "
                          "base model or a full model")
    for p in inputs:
        if PathResolver.same(p, path):
            return p
    raise ConfigError(f"{key}: '{path}' is not one of the merged models {list(inputs)}; name one of them "
                      "(its embedding row is used) or use {kind: zero}")


def builtin_chat_templates() -> dict[str, Path]:
    """mergekit's built-in chat templates (name -> file), from the installed mergekit package
    (found without importing it); empty when mergekit is not installed."""
    try:
        spec = importlib.util.find_spec("mergekit")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "_data" / "chat_templates"
    return {p.stem: p for p in sorted(folder.glob("*.jinja"))}


def chat_template_text(value: Any) -> str | None:
    """``chat_template`` as mergekit 0.1.5 reads it (``merge._set_chat_template``): None or empty:
    none; ``"auto"`` kept; a short name without ``{`` or newline: a built-in template's text; else
    a literal template of at least 20 characters with a ``{``."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"chat_template: expected a template name, 'auto' or a Jinja template, got {value!r}")
    if value == "auto":
        return value
    found = builtin_chat_templates()
    if len(value) < 256 and "\n" not in value and "{" not in value and value in found:
        return found[value].read_text(encoding="utf-8")
    if len(value) < 20 or "{" not in value:
        where = (f"a built-in template {sorted(found)}" if found else
                 "a built-in template (those are read from the mergekit package, which is not installed: install "
                 "mergekit==0.1.5, e.g. pip install 'lightning-merge[parity]', or give the template's text)")
        raise ConfigError(f"chat_template: {value!r} is neither {where}, 'auto', nor a Jinja template (at least 20 "
                          "characters with '{'); fix the name or give the template text")
    return value
