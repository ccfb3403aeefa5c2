"""Step time and memory of ``LearnedMerge`` against plain training of the base model.

    OMP_NUM_THREADS=1 python benchmarks/learned_step.py [--experts 3] [--steps 10] [--batch 8] [--seq 128]

A small BERT sequence classifier (hidden 256, 4 layers, vocabulary 8192: 5.3M parameters) and N
experts (the base plus Gaussian noise, saved once as HF folders under ``benchmarks/_data/learned``).
Each configuration runs in a fresh process:

* ``plain``: forward + backward of the base model with every parameter trainable, plus an AdamW
  step (what fine-tuning one model costs);
* ``learned/<granularity>/<storage>/<objective>``: one ``LearnedMerge`` training step (merged
  tensors, functional forward, backward to the coefficients, Adam step).

Reported: median step time over ``--steps`` steps after 2 warm-up steps; the bank's resident bytes
(base and task vectors); RSS after building the module and peak RSS of the process (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data" / "learned"
CONFIG = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
              max_position_embeddings=256, num_labels=4)


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB
    return float("nan")


def make_models(n: int) -> dict[str, str]:
    from transformers import BertConfig, BertForSequenceClassification

    paths = {"base": DATA / "base", **{f"e{i}": DATA / f"e{i}" for i in range(n)}}
    if all((p / "config.json").is_file() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**CONFIG)).eval()
    base.save_pretrained(paths["base"])
    gen = torch.Generator().manual_seed(1)
    for i in range(n):
        m = BertForSequenceClassification(BertConfig(**CONFIG))
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        m.save_pretrained(paths[f"e{i}"])
    return {k: str(v) for k, v in paths.items()}


def batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, CONFIG["vocab_size"], (args.batch, args.seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, -1] % 4}


def child(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    from transformers import BertForSequenceClassification

    from lightning_merge.learned import LearnedMerge

    paths = make_models(args.experts)
    b = batch(args)
    rss0 = _status("VmRSS")  # after the imports: what building the model adds
    examples = args.batch
    if args.config == "plain":
        model = BertForSequenceClassification.from_pretrained(paths["base"], dtype=torch.float32).eval()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        footprint = {}

        def step() -> None:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        _, granularity, storage, objective = args.config.split("/")
        experts = [paths[f"e{i}"] for i in range(args.experts)]
        module = LearnedMerge(paths["base"], experts, granularity=granularity, storage_dtype=storage,
                              objective=objective, expert_tasks=[f"t{i}" for i in range(args.experts)])
        opt = module.configure_optimizers()
        footprint = module.bank.nbytes()
        data = {f"t{i}": b for i in range(args.experts)} if objective == "dam" else b
        examples = args.batch * (args.experts if objective == "dam" else 1)  # dam: one batch per expert

        def step() -> None:
            loss = module.objective_loss(data)
            reg = module.regularization()
            (loss if reg is None else loss + reg).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    rss_built = _status("VmRSS")
    times = []
    for k in range(args.steps + 2):
        t0 = time.perf_counter()
        step()
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return {"config": args.config, "examples": examples, "step_ms": 1000 * statistics.median(times), "resident_mib":
            {k: v / 2**20 for k, v in footprint.items()}, "rss_after_build_mib": rss_built - rss0,
            "rss_after_build_total_mib": rss_built, "peak_rss_mib": _status("VmHWM")}


CONFIGS = ["plain", "learned/task/float32/entropy", "learned/tensor/float32/entropy", "learned/tensor/bfloat16/entropy",
           "learned/column/float32/entropy", "learned/column/float32/dam", "learned/column/bfloat16/dam"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results_learned_step.json"))
    args = parser.parse_args()
    if args.config is not None:
        sys.stdout.write(json.dumps(child(args)) + "\n")
        return 0
    make_models(args.experts)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    for cfg in CONFIGS:
        cmd = [sys.executable, __file__, "--config", cfg, "--experts", str(args.experts), "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=2))
    print("| config | examples/step | step ms | ms/example | resident base MiB | resident deltas MiB | "
          "RSS after build MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        res = r["resident_mib"]
        print(f"| {r['config']} | {r['examples']} | {r['step_ms']:.1f} | {r['step_ms'] / r['examples']:.1f} | "
              f"{res.get('base', float('nan')):.1f} | "
              f"{res.get('deltas', float('nan')):.1f} | {r['rss_after_build_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
