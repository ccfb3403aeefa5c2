"""PLeaS vs weight averaging vs permutation alignment alone, on scikit-learn's handwritten digits.

    OMP_NUM_THREADS=1 python benchmarks/pleas/digits.py [--seeds 10] [--out benchmarks/pleas]

Setting (the paper's different-label-space case, scaled down): two MLPs 64-64-64-5 (ReLU) trained
from *different* random initialisations, model A on digits 0-4 and model B on digits 5-9, each with
its own 5-way head. Every merge keeps both heads side by side (``head="separate"``: the merged
model outputs [A's 5 logits, B's 5 logits]); a task is scored on its own test images with its own
head. Merges, at the same merged hidden width ρ (merged width / one model's, 1.0 to 2.0):

* ``average``: plain weight averaging (ρ = 1 only: no permutation);
* ``permute``: activation matching + permute-and-average (ZipIt!/Git Re-Basin style partial merge);
* ``pleas``: the same matching, then layer-wise least squares (calibration: 512 training images of
  both tasks, as the authors calibrate on the union of the two training sets);
* ``pleas_free``: PLeaS-free, the features from other data: 8×8 grey patches of the two natural
  photographs scikit-learn ships (``load_sample_images``), scaled to the digits' range.

95% intervals: mean ± t(0.975, k−1)·sd/√k over k seed pairs (each pair: a fresh split, fresh inits,
fresh calibration sample). Runs in about a minute at one thread. Writes ``results_digits<tag>.json``
and ``results_digits<tag>.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_merge.pleas import pleas_merge  # noqa: E402

WIDTHS = (1.0, 1.25, 1.5, 1.75, 2.0)
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262, 15: 2.145,
        20: 2.093}


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data / 16.0, d.target, test_size=0.4, random_state=seed,
                                          stratify=d.target)
    f = torch.float32
    return torch.tensor(xtr, dtype=f), torch.tensor(ytr), torch.tensor(xte, dtype=f), torch.tensor(yte)


def natural_patches(n: int, seed: int) -> torch.Tensor:
    """8×8 grey patches (average-pooled 32×32 crops) of scikit-learn's two sample photographs, in [0, 1]."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    imgs = [im.mean(2) / 255.0 for im in load_sample_images().images]
    out = []
    for _ in range(n):
        im = imgs[rng.integers(len(imgs))]
        i, j = rng.integers(im.shape[0] - 32), rng.integers(im.shape[1] - 32)
        crop = im[i:i + 32, j:j + 32].reshape(8, 4, 8, 4).mean((1, 3))
        lo, hi = crop.min(), crop.max()
        out.append(((crop - lo) / (hi - lo + 1e-8)).reshape(-1))  # full contrast, like the digits
    return torch.tensor(np.stack(out), dtype=torch.float32)


def mlp(seed: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 5))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 60) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def run_seed(seed: int, hidden: int, calib: int) -> dict[str, dict[str, float]]:
    xtr, ytr, xte, yte = digits(seed)
    ta, tb = ytr < 5, ytr >= 5
    a = train(mlp(1000 + seed, hidden), xtr[ta], ytr[ta], seed)
    b = train(mlp(2000 + seed, hidden), xtr[tb], ytr[tb] - 5, seed + 1)
    g = torch.Generator().manual_seed(seed)
    cal = xtr[torch.randperm(len(xtr), generator=g)[:calib]]
    task_loader = list(cal.split(64))
    free_loader = list(natural_patches(calib, seed).split(64))
    ea, eb = yte < 5, yte >= 5

    def score(model: nn.Module, separate: bool = True) -> dict[str, float]:
        with torch.no_grad():
            out = model(xte)
        if not separate:
            return {}
        acc_a, acc_b = accuracy(out[ea, :5], yte[ea]), accuracy(out[eb, 5:], yte[eb] - 5)
        return {"A (0-4)": acc_a, "B (5-9)": acc_b, "mean": (acc_a + acc_b) / 2, "joint 10-way": accuracy(out, yte)}

    with torch.no_grad():
        acc_a, acc_b = accuracy(a(xte[ea]), yte[ea]), accuracy(b(xte[eb]), yte[eb] - 5)
    res = {"model A / model B (own task)": {"A (0-4)": acc_a, "B (5-9)": acc_b, "mean": (acc_a + acc_b) / 2}}
    n = len(task_loader)
    res["average @1.0"] = score(pleas_merge(a, b, None, width=1.0, method="average", head="separate"))
    for w in WIDTHS:
        res[f"permute @{w}"] = score(pleas_merge(a, b, task_loader, width=w, method="permute", head="separate",
                                                 calibration_batches=n))
        res[f"pleas @{w}"] = score(pleas_merge(a, b, task_loader, width=w, head="separate", calibration_batches=n))
        res[f"pleas_free @{w}"] = score(pleas_merge(a, b, free_loader, width=w, head="separate", data_free=True,
                                                    calibration_batches=n))
    return res


def summarize(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    k = len(runs)
    t = T975.get(k, 1.96)
    out: dict[str, dict[str, list[float]]] = {}
    for name in runs[0]:
        out[name] = {}
        for metric in runs[0][name]:
            v = np.array([r[name][metric] for r in runs]) * 100
            half = t * v.std(ddof=1) / math.sqrt(k) if k > 1 else float("nan")
            out[name][metric] = [float(v.mean()), float(half)]
    return out


def table(summary: dict[str, dict[str, list[float]]]) -> str:
    cols = ["A (0-4)", "B (5-9)", "mean", "joint 10-way"]
    lines = ["| merge @ width | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in summary.items():
        cells = [f"{row[c][0]:.1f} ± {row[c][1]:.1f}" if c in row else "–" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--tag", default="", help="suffix of the result files (results_digits<tag>.json/.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runs = [run_seed(s, args.hidden, args.calibration) for s in range(args.seeds)]
    summary = summarize(runs)
    elapsed = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"seeds": args.seeds, "hidden": args.hidden, "calibration_images": args.calibration,
            "widths": list(WIDTHS), "seconds": round(elapsed, 1), "torch": torch.__version__,
            "interval": "mean ± t(0.975, seeds-1)·sd/√seeds over seed pairs, accuracy in %"}
    results = {"meta": meta, "summary": summary, "runs": runs}
    (out / f"results_digits{args.tag}.json").write_text(json.dumps(results, indent=1))
    md = table(summary)
    (out / f"results_digits{args.tag}.md").write_text(f"{md}\n\n{args.seeds} seed pairs, hidden {args.hidden}, "
                                           f"{args.calibration} calibration images; {elapsed:.0f} s.\n")
    print(md)
    print(f"{elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
