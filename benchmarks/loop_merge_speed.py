"""The loop's own merge paths against the offline merge of the same model (issue 13, scope 5).

On the generated 140M Llama of ``merge_speed.py`` (base + 3 experts, float32 folders), in one
process, warm page cache, for TIES, DARE-TIES, DELLA and adaptive-RMS with ``merge_speed.py``'s
hyperparameters:

* ``offline``: ``merge_models(base, experts, method, out=<folder>)``: read, merge, write an HF folder;
* ``into module``: ``merge_models(None, experts, method, out=model)``: what ``MergeCallback`` does
  at fit / validate / test start (read the experts, the module's own weights are the base, merge in
  place, keep the backup);
* ``search candidate``: ``MergeSearch._merge`` of one candidate on inputs cached once by
  ``cache_inputs`` (the task vectors in memory): what every candidate after the first costs.
  The one-off cache build is reported on its own line.

Each path runs ``--rounds`` times; the table gives the median. Nothing here is timed in a test.

    python benchmarks/loop_merge_speed.py [--rounds 3] [--methods ties dare_ties della adaptive_rms]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import merge_speed  # noqa: E402  (the generated models and the configs)

CANDIDATES = {
    "ties": {"method": "ties", "density": 0.3, "normalize": True, "lambda_": 1.0},
    "dare_ties": {"method": "dare_ties", "density": 0.3, "lambda_": 1.0},
    "della": {"method": "della", "density": 0.5, "epsilon": 0.2, "lambda_": 1.0},
    "adaptive_rms": {"method": "adaptive_rms", "drop_rate": 0.7, "drop_scale": 0.5},
}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--size", default="140m", choices=list(merge_speed.SIZES))
    ap.add_argument("--json", type=Path, default=HERE / "results_loop_merge_speed.json")
    args = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    from lightning_merge import MergeSearch, get_method, merge_models
    from lightning_merge.lightning.search_cache import cache_inputs
    from lightning_merge.sources.resolve import open_source

    root = merge_speed.make_models(args.size)
    base, experts = str(root / "base"), [str(root / f"expert{j}") for j in (1, 2, 3)]
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    search = MergeSearch(experts, candidates=[CANDIDATES[m] for m in args.methods])
    t0 = time.perf_counter()
    sources = [open_source(e) for e in experts]
    inputs = cache_inputs(model, sources, space=search._space())
    cache_s = time.perf_counter() - t0

    rows = []
    for k, name in enumerate(args.methods):
        cand = dict(CANDIDATES[name])
        method = get_method(cand.pop("method"), **cand)
        offline, into, candidate = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                offline.append(timed(functools.partial(merge_models, base, experts, method, out=Path(tmp) / f"o{r}")))
        for _ in range(args.rounds):
            into.append(timed(functools.partial(merge_models, None, experts, method, out=model)))
            model._lightning_merge_backup.restore()
        for _ in range(args.rounds):
            candidate.append(timed(functools.partial(search._merge, search.candidates[k], model, inputs)))
        rows.append({"method": name, "offline_s": offline, "into_module_s": into, "candidate_s": candidate})
        print(f"{name:<13} offline {statistics.median(offline):6.2f} s   into module "
              f"{statistics.median(into):6.2f} s   search candidate {statistics.median(candidate):6.2f} s",
              flush=True)
    print(f"search cache (once per search): {cache_s:.2f} s")
    meta = {"size": args.size, "rounds": args.rounds, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}, "
                       f"torch {torch.__version__}", "date": time.strftime("%Y-%m-%d")}
    args.json.write_text(json.dumps({"meta": meta, "cache_s": cache_s, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
