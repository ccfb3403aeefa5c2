"""Where the seconds of one ``lightning-merge merge`` go: a per-stage breakdown (issue 13).

Runs the CLI in this process on one mergekit YAML with timers wrapped around the functions that
make up each stage, reading serially (the read-ahead thread is switched off, so the stages add up
to the wall time instead of overlapping). Stages:

* ``start-up``: importing torch and ``lightning_merge.api`` (one fresh subprocess, timed alone);
* ``plan``: building the merge plan (config, headers, shapes);
* ``read``: ``Source.get`` of every input tensor (safetensors, page cache warm);
* ``deltas``: the rest of loading: casts to float32, δ = θ_t − θ₀, copies;
* ``selection``: top-k thresholds and masks (TIES, DARE-TIES trims), DELLA's per-row ranks and keep
  probabilities;
* ``random masks``: the Bernoulli keep masks (``bernoulli_keep``);
* ``election + fuse``: sign election and the disjoint mean (``elect_and_fuse``);
* ``method, other``: what the method's ``merge`` does besides the three above (mask application,
  rescales, λ, adding θ₀);
* ``cast + checks``: the finiteness check of the result and the cast to the output dtype;
* ``write``: the safetensors writer, the atomic move and everything else until the CLI returns.

Stages nest (a wrapper inside another stage's function counts only once: the outer one).

    python benchmarks/merge_profile.py CONFIG.yaml [--code PATH] [--threads N] [--json OUT]

``--code`` imports ``lightning_merge`` from another checkout (e.g. a ``git worktree`` of an older
commit) to measure before and after with the same stage boundaries.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

SELECTION = ("topk_mask", "topk_threshold", "topk_thresholds", "threshold_mask", "magprune_keep_prob")
MASKS = ("bernoulli_keep",)
FUSE = ("elect_and_fuse",)


class Timers:
    """Seconds per stage. A call made while its stage runs (nested, or on a worker thread the outer
    call started) is not counted again; different stages may nest (``read`` inside ``load``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.depth: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def wrap(self, stage: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if stage != "statistics" and self.depth["statistics"]:
                return fn(*args, **kwargs)  # the statistics passes are one stage of their own
            with self.lock:
                outer = self.depth[stage] == 0
                self.depth[stage] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.depth[stage] -= 1
                    if outer:
                        self.seconds[stage] += time.perf_counter() - t0

        return timed


def _walk(package: str):
    pkg = importlib.import_module(package)
    yield pkg
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        try:
            yield importlib.import_module(info.name)
        except ImportError:  # optional extras
            continue


def instrument(timers: Timers) -> None:
    """Wrap the stage functions wherever the methods, engine and sources modules refer to them."""
    import lightning_merge.engine as engine

    engine.PREFETCH_MAX_OVERLAP = -1  # read serially: stages add up instead of overlapping
    kernels = [(SELECTION, "selection"), (MASKS, "random masks"), (FUSE, "election + fuse")]
    originals: dict[str, object] = {}
    for mod in _walk("lightning_merge.methods"):
        for names, stage in kernels:
            for name in names:
                fn = getattr(mod, name, None)
                if fn is None or not callable(fn):
                    continue
                wrapped = originals.setdefault(f"{stage}:{name}", timers.wrap(stage, fn))
                if getattr(fn, "__wrapped__", None) is None:
                    setattr(mod, name, wrapped)
    from lightning_merge.methods.base import MergeMethod

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in {MergeMethod, *subclasses(MergeMethod)}:
        for attr in ("merge", "merge_delta"):
            if attr in cls.__dict__:
                setattr(cls, attr, timers.wrap("method", cls.__dict__[attr]))
    for mod in _walk("lightning_merge.sources"):
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == mod.__name__ and "get" in cls.__dict__:
                cls.get = timers.wrap("read", cls.__dict__["get"])
    engine.load_inputs = timers.wrap("load", engine.load_inputs)
    engine.merge_task = timers.wrap("merge_task", engine.merge_task)
    engine.build_plan = timers.wrap("plan", engine.build_plan)
    engine.compute_statistics = timers.wrap("statistics", engine.compute_statistics)
    import lightning_merge.api as api

    api.build_plan = engine.build_plan


def startup_seconds(code: Path | None) -> float:
    prefix = f"import sys; sys.path.insert(0, {str(code)!r}); " if code else ""
    stmt = prefix + ("import time; t = time.perf_counter(); import torch, lightning_merge.api; "
                     "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", stmt], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def profile(config: Path, code: Path | None, threads: int | None) -> dict:
    if code is not None:
        sys.path.insert(0, str(code))
    startup = startup_seconds(code)
    import torch

    if threads:
        torch.set_num_threads(threads)
    import lightning_merge
    from lightning_merge.cli import main

    timers = Timers()
    instrument(timers)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rc = main(["merge", str(config), str(Path(tmp) / "out")])
        total = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"merge failed with exit status {rc}")
    s = timers.seconds
    kernel = s["selection"] + s["random masks"] + s["election + fuse"]
    stages = {
        "start-up": startup,
        "plan": s["plan"],
        "statistics passes": s["statistics"],
        "read": s["read"],
        "deltas": s["load"] - s["read"],
        "selection": s["selection"],
        "random masks": s["random masks"],
        "election + fuse": s["election + fuse"],
        "method, other": s["method"] - kernel,
        "cast + checks": s["merge_task"] - s["method"],
        "write": total - s["plan"] - s["statistics"] - s["load"] - s["merge_task"],
    }
    return {"config": str(config), "code": str(Path(lightning_merge.__file__).parent),
            "threads": torch.get_num_threads(), "merge_seconds": total,
            "total_seconds": total + startup, "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--code", type=Path, default=None, help="a checkout whose lightning_merge to import")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = profile(args.config, args.code, args.threads)
    width = max(map(len, result["stages"]))
    for stage, sec in result["stages"].items():
        print(f"{stage:<{width}}  {sec:7.2f} s  {100 * sec / result['total_seconds']:5.1f} %")
    print(f"{'total':<{width}}  {result['total_seconds']:7.2f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
