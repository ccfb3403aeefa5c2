"""``make demo``: train small experts offline, merge them with every method, print the table.

The story of the product at a size that runs in about a minute on two CPU cores, with no download:

1. a small Llama-architecture causal LM (Hugging Face ``LlamaForCausalLM``) is pre-trained briefly
   on a mixture of four sequence tasks (``[task, x1..x8, SEP] -> answer``: copy, reverse, sort,
   shift x+1 mod 36): a generalist that is mediocre at each;
2. four experts are fine-tuned from it, each on its own task: three full fine-tunes saved as HF
   folders and one real PEFT LoRA adapter (*shift*);
3. base, experts and merges (task arithmetic, TIES, DARE, DELLA, adaptive-RMS, DPPA, breadcrumbs,
   soup; the LoRA adapter merges in exact dense-delta space) are scored on every task: accuracy of
   the predicted answer tokens on 512 held-out examples per task;
4. the best merge is written as an HF folder with ``lightning-merge merge`` from a mergekit YAML.

Run ``python -m lightning_merge.demo [--workdir out/demo] [--steps 400]``. Trained experts are
cached in the work directory. The Lightning training loop (merge callback, merge search, DDP)
replaces the plain loops here when it lands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("lightning_merge.demo")

N_SYM, LEN = 36, 8
PAD, SEP = 0, 1
TASKS = ("copy", "reverse", "sort", "shift")
TASK_TOKEN = {t: 2 + i for i, t in enumerate(TASKS)}
FIRST = 2 + len(TASKS)  # symbols are FIRST .. FIRST + N_SYM - 1
VOCAB = FIRST + N_SYM


def make_batch(task: str, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences ``[task, x1..x8, SEP, y1..y8]`` and the loss mask of the answer tokens."""
    x = torch.randint(0, N_SYM, (n, LEN), generator=gen)
    y = {
        "copy": x,
        "reverse": x.flip(1),
        "sort": x.sort(1).values,
        "shift": (x + 1) % N_SYM,
    }[task]
    head = torch.full((n, 1), TASK_TOKEN[task])
    seq = torch.cat([head, x + FIRST, torch.full((n, 1), SEP), y + FIRST], 1)
    mask = torch.zeros_like(seq, dtype=torch.bool)
    mask[:, LEN + 2:] = True
    return seq, mask


def new_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def train(model, tasks: tuple[str, ...], steps: int, seed: int, lr: float = 3e-3) -> None:
    """AdamW with a one-cycle schedule on batches of 64 drawn from ``tasks`` in turn."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        task = tasks[step % len(tasks)]
        seq, mask = make_batch(task, 64, gen)
        logits = model(input_ids=seq).logits[:, :-1]
        target = seq[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(steps // 4, 1) == 0:
            log.info("  %s step %d/%d loss %.3f", "+".join(tasks), step + 1, steps, loss.item())
    model.eval()


@torch.no_grad()
def accuracy(model, task: str, n: int = 512) -> float:
    """Accuracy (%) of the argmax prediction at every answer position (teacher forcing)."""
    seq, mask = make_batch(task, n, torch.Generator().manual_seed(10_000 + TASKS.index(task)))
    pred = model(input_ids=seq).logits[:, :-1].argmax(-1)
    hit = (pred == seq[:, 1:])[mask[:, 1:]]
    return hit.float().mean().item() * 100


@dataclass
class Row:
    name: str
    scores: dict[str, float]
    seconds: float | None = None
    method: object = None

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


EXPERTS = {"copy": "expert_copy", "reverse": "expert_reverse", "sort": "expert_sort", "shift": "expert_shift_lora"}


def build_models(work: Path, steps: int, base_steps: int) -> None:
    """Pre-train the generalist base and fine-tune the four experts (cached in ``work``)."""
    from peft import LoraConfig, get_peft_model

    if all((work / d).is_dir() for d in EXPERTS.values()):
        log.info("using the cached base and experts in %s", work)
        return
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("pre-training the base on a mixture of %s (%d steps)", list(TASKS), base_steps)
    base = new_model()
    train(base, TASKS, base_steps, seed=1)
    base.save_pretrained(work / "base")
    for k, (task, folder) in enumerate(EXPERTS.items()):
        model = new_model()
        model.load_state_dict(base.state_dict())
        if folder.endswith("_lora"):
            log.info("fine-tuning the '%s' expert (PEFT LoRA r=16 on every projection, %d steps)", task, steps)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
            train(model, (task,), steps, seed=2 + k, lr=1e-3)
        else:
            log.info("fine-tuning the '%s' expert (full fine-tune, %d steps)", task, steps)
            train(model, (task,), steps, seed=2 + k, lr=3e-4)
        model.save_pretrained(work / folder)
    log.info("base and experts ready in %.0f s", time.perf_counter() - t0)


def run(work: Path, steps: int, base_steps: int) -> list[Row]:
    from transformers import LlamaForCausalLM

    from . import (
        DPPA,
        AdaptiveRMS,
        BreadcrumbsTies,
        DareLinear,
        DareTies,
        Della,
        Linear,
        TaskArithmetic,
        Ties,
    )
    from .api import merge_models

    build_models(work, steps, base_steps)
    base = LlamaForCausalLM.from_pretrained(work / "base")
    experts = [str(work / folder) for folder in EXPERTS.values()]
    rows = [Row("base", {t: accuracy(base, t) for t in TASKS})]
    for path, task in zip(experts, EXPERTS):
        model = LlamaForCausalLM.from_pretrained(work / "base")
        merge_models(None, [path], TaskArithmetic(), out=model)
        rows.append(Row(f"expert: {task}", {t: accuracy(model, t) for t in TASKS}))

    methods = {
        "soup (uniform)": Linear(),
        "task arithmetic λ=0.5": TaskArithmetic(lambda_=0.5),
        "task arithmetic λ=1": TaskArithmetic(lambda_=1.0),
        "TIES d=0.2 λ=1": Ties(density=0.2),
        "TIES d=0.5 λ=1": Ties(density=0.5),
        "DARE linear d=0.3 λ=0.5": DareLinear(density=0.3, lambda_=0.5),
        "DARE-TIES d=0.3 λ=1": DareTies(density=0.3),
        "DELLA d=0.3 ε=0.2 λ=1": Della(density=0.3, epsilon=0.2),
        "DELLA d=0.5 ε=0.2 λ=1": Della(density=0.5, epsilon=0.2),
        "breadcrumbs-TIES d=0.5": BreadcrumbsTies(density=0.5, gamma=0.01),
        "adaptive-RMS p=0.7": AdaptiveRMS(drop_rate=0.7, drop_scale=0.5),
        "DPPA 10%/20% λ=0.5": DPPA(lambda_=0.5),
    }
    for label, method in methods.items():
        model = LlamaForCausalLM.from_pretrained(work / "base")
        t0 = time.perf_counter()
        base_arg = str(work / "base") if method.space == "weight" else None
        if base_arg is None:
            merge_models(None, experts, method, out=model, seed=0)
        else:  # a soup averages full weights: the adapter becomes base + delta
            merge_models(base_arg, experts, method, out=model, seed=0)
        seconds = time.perf_counter() - t0
        rows.append(Row(label, {t: accuracy(model, t) for t in TASKS}, seconds, method))
    return rows


def table(rows: list[Row]) -> str:
    head = "| model | " + " | ".join(TASKS) + " | mean | merge s |"
    lines = [head, "|" + "---|" * (len(TASKS) + 3)]
    for r in rows:
        cells = " | ".join(f"{r.scores[t]:5.1f}" for t in TASKS)
        secs = f"{r.seconds:.2f}" if r.seconds is not None else ""
        lines.append(f"| {r.name} | {cells} | {r.mean:5.1f} | {secs} |")
    return "\n".join(lines)


def write_outputs(work: Path, rows: list[Row]) -> tuple[Path, Path]:
    """Save the best merge as an HF folder, and run the one-shot command on a mergekit YAML."""
    import yaml

    from .api import merge_models
    from .cli import main as cli_main

    experts = [str(work / folder) for folder in EXPERTS.values()]
    best = max((r for r in rows if r.method is not None), key=lambda r: r.mean)
    log.info("best merge by mean accuracy: %s (%.1f)", best.name, best.mean)
    best_dir = merge_models(str(work / "base"), experts, best.method, out=work / "merged_best", seed=0,
                            overwrite=True)
    cfg = {
        "merge_method": "ties",
        "base_model": str(work / "base"),
        "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
    }
    (work / "ties.yml").write_text(yaml.safe_dump(cfg))
    out = work / "merged_ties"
    status = cli_main(["merge", str(work / "ties.yml"), str(out), "--overwrite", "--no-progress"])
    if status != 0:
        raise SystemExit(status)
    return best_dir, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightning_merge.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("out/demo"))
    ap.add_argument("--base-steps", type=int, default=120, help="pre-training steps of the base")
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps of each expert")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("lightning_merge").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    rows = run(args.workdir, args.steps, args.base_steps)
    log.info("\nAnswer-token accuracy (%%) on 512 held-out examples per task:\n\n%s\n", table(rows))
    (args.workdir / "results.json").write_text(json.dumps(
        [{"model": r.name, **r.scores, "mean": r.mean, "merge_seconds": r.seconds} for r in rows], indent=1))
    (args.workdir / "results.md").write_text(table(rows) + "\n")
    best_dir, out = write_outputs(args.workdir, rows)
    log.info("wrote the best merge to %s, and %s with `lightning-merge merge %s %s`; results in %s; "
             "total %.0f s", best_dir, out, args.workdir / "ties.yml", out, args.workdir / "results.json",
             time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
