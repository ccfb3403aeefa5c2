"""Conformance with mergekit 0.1.5 on mergekit's own example and test configurations (slow, parity).

Every YAML of tests/data/mergekit_conformance/ (mergekit's ``examples/`` and the configurations its
merge tests build; origins in that folder's README.md) runs on tiny local models through mergekit
0.1.5 and through ``lightning-merge merge`` (tests/conformance_report.py runs, compares and
classifies; its docstring gives the tolerances; as a script it writes docs/mergekit_conformance.md).
Every case must *agree*: same tensors (float32 rounding; in distribution for DARE/DELLA), same
config.json layer count and vocabulary size, same tokenizer and chat template, and both outputs pass
the checks of the case's own mergekit test (:data:`CHECKS`), except the cases in :data:`EXPECTED`,
with the reason. When a feature lands or mergekit is fixed, delete the rows.

Models (:data:`MODELS`). Every model name (a hub id such as ``psmathur/orca_mini_v3_13b``, or a
mergekit test fixture such as ``model_a``) is a tiny model of one family, built once per session:
one seeded base per family, expert k = base + N(0, σ²) noise with σ = 0.01·(1 + (k − 1)/2), float32
safetensors saved by ``save_pretrained``, each with mergekit's test tokenizer (a 64-token BPE,
``LlamaTokenizerFast``). ``model_chatml`` has 2 more embedding rows and 2 added tokens,
``model_padded`` 4 added tokens without rows (as in mergekit's tests). The "13B" Llama-2 family
has 40 layers (its ``layer_range``s reach 40), GPT-2 12 (``layer_range: [0, 12]``), the others 2.
transformers 5 saves LLaVA under its legacy names (``language_model.model.*``); every LLaVA case
runs once more as ``CASE@v5-names`` on the weights renamed to transformers 5's
(``model.language_model.*``), the only layout mergekit 0.1.5 reads completely.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("mergekit")
pytestmark = [pytest.mark.slow, pytest.mark.parity]

from conformance_report import CASES_DIR, VARIANT, _rewrite, load_case, run_case  # noqa: E402

#: mergekit's own test assertions, per case (see :func:`check`)
CHECKS: dict[str, dict[str, Any]] = {
    "tests__test_basic_merges__test_gpt2_stack": {"layers": 24},
    "tests__test_basic_merges__test_passthrough_scale": {"zero": "o_proj", "nonzero": "lm_head"},
    "tests__test_basic_merges__test_della_invalid_epsilon": {"error": True},
    "examples__orcamini-platy-44layer": {"layers": 44},
    "tests__test_tokenizer__test_legacy_mode": {"vocab": 64, "added": 3},
    "tests__test_tokenizer__test_source_base": {"vocab": 64, "added": 3},
    "tests__test_tokenizer__test_source_union": {
        "vocab": 66, "added": 5, "has": ["<|im_start|>", "<|im_end|>"], "lacks": [f"<UNUSED_{i}>" for i in range(4)],
        "rows_from": {"<|im_start|>": "model_chatml", "<|im_end|>": "model_chatml"}},
    "tests__test_tokenizer__test_source_model": {"vocab": 66, "has": ["<|im_start|>", "<|im_end|>"]},
    "tests__test_tokenizer__test_slerp_union": {"vocab": 66, "has": ["<|im_start|>", "<|im_end|>"]},
    "tests__test_tokenizer__test_force_token": {
        "vocab": 66, "has": ["<|im_start|>", "<|im_end|>"],
        "rows_from": {"_tok_10": "model_chatml", "_tok_11": "model_base"}},
    "tests__test_tokenizer__test_model_token_id": {
        "vocab": 64, "has": ["_tok_10"], "rows_from": {"_tok_20": ("model_chatml", 64), "_tok_21": ("model_base", 1)}},
    "tests__test_tokenizer__test_pad_to_multiple_of": {"vocab": 66, "vocab_size": 80, "rows": 80},
    "tests__test_chat_template__test_template_chatml": {"template_has": "<|im_start|>"},
    "tests__test_chat_template__test_template_literal_jinja": {"template_has": "{{messages[0]['content']}}"},
}

# ---------------------------------------------------------------------------------------------- models
#: model name -> (family, k): k = 0 is the family's base, k >= 1 its k-th expert
MODELS: dict[str, tuple[str, int]] = {
    "model_base": ("pico", 0), "model_a": ("pico", 1), "model_b": ("pico", 2), "model_c": ("pico", 3),
    "model_chatml": ("pico", 4), "model_padded": ("pico", 5),
    "granite_a": ("granite", 1), "granite_b": ("granite", 2), "gpt2_like": ("gpt2", 0),
    "vlm_a": ("llava", 1), "vlm_b": ("llava", 2), "vlm_c": ("llava", 3),
    "TheBloke/Llama-2-13B-fp16": ("llama2_13b", 0), "psmathur/orca_mini_v3_13b": ("llama2_13b", 1),
    "garage-bAInd/Platypus2-13B": ("llama2_13b", 2), "WizardLM/WizardLM-13B-V1.2": ("llama2_13b", 3),
    "WizardLM/WizardMath-13B-V1.0": ("llama2_13b", 4),
    "mistralai/Mistral-7B-v0.1": ("mistral", 0), "mistralai/Mistral-7B-Instruct-v0.2": ("mistral", 1),
    "BioMistral/BioMistral-7B": ("mistral", 2),
}
#: model name -> (extra embedding rows, added tokens), as mergekit's tokenizer tests build them
VOCAB: dict[str, tuple[int, list[str]]] = {
    "model_chatml": (2, ["<|im_start|>", "<|im_end|>"]),
    "model_padded": (0, [f"<UNUSED_{i}>" for i in range(4)]),
}
FAMILIES = ("pico", "granite", "gpt2", "llava", "llama2_13b", "mistral")


def _family_config(family: str, vocab: int = 64) -> Any:
    import transformers as tf

    llama = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)
    if family == "pico":  # mergekit's tests/common.py make_picollama
        return tf.LlamaConfig(**llama)
    if family == "llama2_13b":
        return tf.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                              num_hidden_layers=40)
    if family == "mistral":
        return tf.MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                num_key_value_heads=2, num_hidden_layers=2)
    if family == "granite":  # make_picogranite
        return tf.GraniteConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                num_key_value_heads=2, num_hidden_layers=2)
    if family == "gpt2":  # make_gpt2size's 12 layers, at width 32 and 64 tokens
        return tf.GPT2Config(n_embd=32, n_head=4, n_layer=12, n_positions=64, vocab_size=vocab,
                              bos_token_id=1, eos_token_id=2)
    if family == "llava":  # make_picoLlaVa
        vision = tf.CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                                     hidden_size=64, intermediate_size=128)
        return tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**llama), image_seq_length=16)
    raise KeyError(family)


def _model_class(model_type: str) -> Any:
    import transformers as tf

    return tf.LlavaForConditionalGeneration if model_type == "llava" else tf.AutoModelForCausalLM


def _new_model(family: str, vocab: int = 64) -> torch.nn.Module:
    cls, cfg = _model_class(family), _family_config(family, vocab)
    return cls(cfg) if family == "llava" else cls.from_config(cfg)


def make_tokenizer(added: list[str]) -> Any:
    """mergekit's tests/test_tokenizer.py ``make_tokenizer(64, added)``."""
    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, 64)]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(64))), "merges": []},
            "added_tokens": []}
    with tempfile.TemporaryDirectory() as d:
        tokenizers.Tokenizer.from_str(json.dumps(data)).save(os.path.join(d, "tokenizer.json"))
        tok = LlamaTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    tok.add_tokens(added)
    return tok


def _v5_name(name: str) -> str:
    """LLaVA's legacy checkpoint name -> transformers 5's."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")):
        if name.startswith(old):
            return new + name[len(old):]
    return "model." + name


def build_models(root: Path) -> dict[str, Path]:
    """Save every model of :data:`MODELS` (LLaVA ones also as ``NAME@v5-names``); name -> folder."""
    from safetensors.torch import load_file, save_file

    bases: dict[str, dict[str, torch.Tensor]] = {}
    paths = {}
    for name, (family, k) in MODELS.items():
        fi = FAMILIES.index(family)
        if family not in bases:
            torch.manual_seed(fi)
            bases[family] = {n: t.clone() for n, t in _new_model(family).state_dict().items()}
        extra, added = VOCAB.get(name, (0, []))
        torch.manual_seed(100 * fi + k)  # the extra embedding rows come from this init
        model = _new_model(family, 64 + extra)
        state = model.state_dict()
        for n, t in bases[family].items():
            state[n][: t.shape[0]] = t
        model.load_state_dict(state)
        gen = torch.Generator().manual_seed(1000 * fi + k)
        with torch.no_grad():
            for p in model.parameters() if k else ():
                p.add_(0.01 * (1 + (k - 1) / 2) * torch.randn(p.shape, generator=gen))
        paths[name] = root / name.replace("/", "__")
        model.save_pretrained(paths[name])
        make_tokenizer(added).save_pretrained(paths[name])
        if family == "llava":
            paths[name + VARIANT] = v5 = root / f"{name}_v5-names"  # no '@': mergekit reads it as a revision
            shutil.copytree(paths[name], v5)
            tensors = load_file(v5 / "model.safetensors")
            save_file({_v5_name(n): t for n, t in tensors.items()}, v5 / "model.safetensors", {"format": "pt"})
    return paths


def _case_ids() -> list[str]:
    out = []
    for stem in sorted(p.stem for p in CASES_DIR.glob("*.yml")):
        families: set[str] = set()
        _rewrite(load_case(stem), lambda n, seen=families: seen.add(MODELS[n][0]) or n)
        out += [stem] + ([stem + VARIANT] if "llava" in families else [])
    return out


CASES = _case_ids()

_LLAVA_NAMES = (
    "mergekit 0.1.5 has no architecture file for LlavaForConditionalGeneration and infers one with transformers "
    "5's names (model.language_model.*); transformers 5.24 saves LLaVA under the legacy names "
    "(language_model.model.*), so mergekit silently drops the whole language model (writes 43 of 64 tensors) and "
    "its output does not load. Its own test_*_VLM_* tests pass regardless (test_linear_VLM_merge at a6e4028 run "
    "against 0.1.5: 43 of 64 tensors), as they check the output against that same inferred architecture. Ours "
    "writes all 64; the @v5-names row is the same case on renamed weights, where the two are compared"
)
_LEGACY_VOCAB = (
    "mergekit 0.1.5 stops, and fails this very test of the a6e4028 tree (run against 0.1.5): 'ValueError: Tensor "
    "size mismatch for lm_head.weight: [(64, 32), (64, 32), (66, 32)]. Align vocabulary axes with tokenizer "
    "configuration before merging' (a check newer than that tree). The test expects a merge with the base's "
    "64-token tokenizer and 3 added tokens; ours writes that (tokenizer_source absent: the base's tokenizer, the "
    "larger embeddings truncated to its vocabulary, as documented)"
)

#: case -> (outcome, reason) for every case that does not agree today. Delete a row when it agrees.
EXPECTED: dict[str, tuple[str, str]] = {
    "tests__test_tokenizer__test_legacy_mode": ("mergekit_crash", _LEGACY_VOCAB),
    **{c: ("mergekit_wrong", _LLAVA_NAMES) for c in CASES if "_VLM_" in c and "@" not in c},
}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("conformance_models"))


def test_tables_name_real_cases() -> None:
    assert set(EXPECTED) <= set(CASES), sorted(set(EXPECTED) - set(CASES))
    assert set(CHECKS) <= set(CASES), sorted(set(CHECKS) - set(CASES))
    assert len(CASES) == 65 + 17  # 65 YAMLs, 17 of them LLaVA cases run twice


@pytest.mark.parametrize("case", CASES)
def test_case(case: str, models: dict[str, Path], tmp_path: Path) -> None:
    got = run_case(case, models, tmp_path, CHECKS.get(case.partition("@")[0]))
    want = EXPECTED.get(case, ("agree", ""))
    assert got.kind == want[0], f"{case}: {got.kind} ({got.detail}); EXPECTED says {want[0]}: {want[1]}"
