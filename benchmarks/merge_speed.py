"""Wall time and peak memory of lightning-merge against mergekit 0.1.5 and the read-only floor.

Generates float32 Llama-shaped models (base + 3 experts) of about 140M and 400M parameters under
benchmarks/_data (reused when present), then runs, each in a fresh subprocess, one after another:

* ``read``: open every safetensors shard of the 4 models and read every tensor (the I/O floor);
* ``lightning-merge merge CONFIG OUT`` and ``mergekit-yaml CONFIG OUT`` on the same YAML for
  ties, dare_ties, della and (ours only) adaptive_rms.

Memory is sampled every 20 ms from /proc/<pid>/status of the process tree: peak RSS (includes the
page cache of mmap-ed inputs) and peak RssAnon ("private": what the process itself allocated).
The page cache is warmed by the read pass first, so every run reads from memory.

    python benchmarks/merge_speed.py [--sizes 140m 400m] [--methods ties dare_ties della adaptive_rms]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
BIN = Path(sys.executable).parent

SIZES = {
    # name: (hidden, intermediate, layers, vocab)
    "140m": (768, 2048, 12, 32000),
    "400m": (1024, 3072, 24, 32000),
}
CONFIGS = {
    "ties": {"merge_method": "ties", "parameters": {"normalize": True, "lambda": 1.0}, "density": 0.3},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"lambda": 1.0}, "density": 0.3},
    "della": {"merge_method": "della", "parameters": {"lambda": 1.0}, "density": 0.5, "epsilon": 0.1},
    "adaptive_rms": {"merge_method": "adaptive_rms", "parameters": {"drop_rate": 0.7, "drop_scale": 0.5}},
}


def make_models(size: str) -> Path:
    """Write base + 3 experts (base + N(0, 0.01²) noise with expert-specific structure) once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = DATA / size
    if (root / "expert3" / "config.json").exists():
        return root
    hidden, inter, layers, vocab = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                      tie_word_embeddings=False, dtype="float32")
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    sd = {k: torch.randn(v.shape) * 0.02 for k, v in model.state_dict().items()}
    DATA.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=DATA))
    for j in range(4):
        name = "base" if j == 0 else f"expert{j}"
        g = torch.Generator().manual_seed(j)
        tensors = sd if j == 0 else {k: v + torch.randn(v.shape, generator=g) * 0.002 * j for k, v in sd.items()}
        out = tmp / name
        out.mkdir()
        cfg.save_pretrained(out)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    os.replace(tmp, root) if not root.exists() else None
    n = sum(v.numel() for v in sd.values())
    print(f"generated {size}: {n / 1e6:.1f}M parameters per model under {root}", flush=True)
    return root


def write_config(root: Path, method: str, path: Path) -> None:
    import yaml

    spec = dict(CONFIGS[method])
    density, epsilon = spec.pop("density", None), spec.pop("epsilon", None)
    params = {}
    if density is not None:
        params["density"] = density
    if epsilon is not None:
        params["epsilon"] = epsilon
    cfg = {
        "merge_method": spec["merge_method"],
        "base_model": str(root / "base"),
        "models": [{"model": str(root / f"expert{j}"), "parameters": {"weight": 1.0, **params}} for j in (1, 2, 3)],
        "parameters": spec["parameters"],
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(cfg))


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; sample peak RSS / RssAnon of its process tree; return seconds and GiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        rss = anon = 0
        for pid in _tree(proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            rss += int(fields.get("VmRSS", "0 kB").split()[0])
            anon += int(fields.get("RssAnon", "0 kB").split()[0])
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": wall, "peak_rss_gib": peak_rss / 2**20, "peak_private_gib": peak_anon / 2**20}


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


READ_FLOOR = """
import sys
import torch
from safetensors import safe_open
for path in sys.argv[1:]:
    with safe_open(path, "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)  # a view of a memory map: copy it so that every page is really read
            torch.empty_like(t).copy_(t)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["140m", "400m"], choices=sorted(SIZES))
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--json", type=Path, default=HERE / "results_merge_speed.json")
    args = ap.parse_args()
    DATA.mkdir(exist_ok=True)
    has_mergekit = shutil.which("mergekit-yaml", path=str(BIN)) is not None and not args.no_mergekit
    results = []
    for size in args.sizes:
        root = make_models(size)
        files = [str(root / m / "model.safetensors") for m in ("base", "expert1", "expert2", "expert3")]
        measure([sys.executable, "-c", READ_FLOOR, *files])  # warm the page cache
        floor = measure([sys.executable, "-c", READ_FLOOR, *files])
        results.append({"size": size, "tool": "read inputs", "method": "-", **floor})
        print(json.dumps(results[-1]), flush=True)
        for method in args.methods:
            with tempfile.TemporaryDirectory(dir=DATA) as tmp:
                cfg = Path(tmp) / "config.yml"
                write_config(root, method, cfg)
                ours = measure([str(BIN / "lightning-merge"), "merge", str(cfg), str(Path(tmp) / "ours"),
                                "--seed", "0", "--no-progress"])
                results.append({"size": size, "tool": "lightning-merge", "method": method, **ours})
                print(json.dumps(results[-1]), flush=True)
                if has_mergekit and method != "adaptive_rms":
                    mk = measure([str(BIN / "mergekit-yaml"), str(cfg), str(Path(tmp) / "mk"), "--no-cuda",
                                  "--lazy-unpickle", "--random-seed", "0", "--quiet"])
                    results.append({"size": size, "tool": "mergekit 0.1.5", "method": method, **mk})
                    print(json.dumps(results[-1]), flush=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "python": platform.python_version(), "command": " ".join(sys.argv)}
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table(results))


def table(results: list[dict]) -> str:
    rows = ["| size | tool | method | wall s | peak RSS GiB | peak private GiB |", "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['size']} | {r['tool']} | {r['method']} | {r['seconds']:.1f} | "
                    f"{r['peak_rss_gib']:.2f} | {r['peak_private_gib']:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
