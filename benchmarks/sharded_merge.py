"""Per-rank memory and wall time of a MergeCallback merge: DDP against FSDP2 shards, 1-3 CPU ranks.

For each strategy, rank count and method, one real ``Trainer.validate`` (CPU, gloo) with a
``MergeCallback`` into the 134M-parameter float32 Llama of ``merge_speed.py`` (base + 3 experts,
generated under benchmarks/_data/140m when missing), in a fresh process:

* ``ddp``: the model is loaded in the module's ``__init__`` on every rank; the merge runs in
  ``setup`` (each rank merges a share, then every rank receives every merged tensor);
* ``sharded``: ``ModelParallelStrategy(data_parallel_size=N)``; the model is built on the meta
  device in ``configure_model``, sharded with ``fully_shard`` (each decoder layer, then the root)
  and loaded from the base file; the merge runs into the shards after the strategy's setup.

Each rank resets its peak RSS (``/proc/self/clear_refs``) right before the merge and reads it
right after (``VmHWM``), so model loading does not count; reported: per rank the RSS before the
merge and the peak during it (the largest over ranks), and the merge's wall time (the callback's
own ``time_s``). Three ranks on two cores share the cores.

    python benchmarks/sharded_merge.py [--methods ties dare_ties della] [--worlds 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = {"ties": {"density": 0.3}, "dare_ties": {"density": 0.3}, "della": {"density": 0.5, "epsilon": 0.2}}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(strategy: str, world: int, method: str, root: Path, out: Path) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoConfig, LlamaForCausalLM

    from lightning_merge import MergeCallback, get_method

    torch.set_num_threads(1)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaForCausalLM.from_pretrained(root / "base") if strategy == "ddp" else None

        def configure_model(self) -> None:
            if self.model is not None:
                return
            from safetensors.torch import load_file
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            with torch.device("meta"):
                model = LlamaForCausalLM(AutoConfig.from_pretrained(root / "base"))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.to_empty(device="cpu")
            set_model_state_dict(model, load_file(str(root / "base" / "model.safetensors")),
                                 options=StateDictOptions(full_state_dict=True))
            self.model = model

        def validation_step(self, batch, i):
            return None

    class Meter(Callback):
        def __init__(self, start: bool):
            self.start = start

        def _reset(self) -> None:
            Path("/proc/self/clear_refs").write_text("5")
            self.before, self.t0 = _status("VmRSS"), time.perf_counter()

        def setup(self, trainer, module, stage):
            if self.start and strategy == "ddp":
                self._reset()

        def on_validation_start(self, trainer, module):
            if self.start and strategy == "sharded":
                self._reset()
            if not self.start:
                first = trainer.callbacks[0]
                merge = next(cb for cb in trainer.callbacks if isinstance(cb, MergeCallback))
                row = {"rank": trainer.global_rank, "rss_before": first.before, "peak": _status("VmHWM"),
                       "merge_s": merge.diagnostics.get("time_s")}
                (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(row))

    experts = [str(root / f"expert{j}") for j in (1, 2, 3)]
    merge = MergeCallback(experts, get_method(method, **METHODS[method]), seed=0, log_diagnostics=False,
                          target="model")
    if strategy == "ddp":
        strat: object = "ddp" if world > 1 else "auto"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strat = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strat, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Meter(True), merge, Meter(False)],
                        limit_val_batches=1, enable_checkpointing=False)
    ids = torch.zeros(world, 4, dtype=torch.long)
    trainer.validate(Module(), DataLoader(TensorDataset(ids), batch_size=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--worker", nargs=4, metavar=("STRATEGY", "WORLD", "METHOD", "OUT"))
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from merge_speed import make_models

    root = make_models("140m")
    if args.worker:
        strategy, world, method, out = args.worker
        worker(strategy, int(world), method, root, Path(out))
        return
    rows = []
    for method in args.methods:
        for strategy in ("ddp", "sharded"):
            for world in args.worlds:
                out = HERE / "_data" / "sharded_runs" / f"{method}_{strategy}_{world}"
                out.mkdir(parents=True, exist_ok=True)
                for f in out.glob("rank*.json"):
                    f.unlink()
                t0 = time.perf_counter()
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                run = subprocess.run([sys.executable, __file__, "--worker", strategy, str(world), method, str(out)],
                                     capture_output=True, text=True, env=env)
                if run.returncode != 0:
                    sys.stderr.write(run.stderr[-3000:])
                    raise SystemExit(f"{method} {strategy} {world}: failed")
                ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
                row = {"method": method, "strategy": strategy, "world": world,
                       "rss_before_gib": max(r["rss_before"] for r in ranks) / 2**30,
                       "peak_gib": max(r["peak"] for r in ranks) / 2**30,
                       "merge_s": max(r["merge_s"] for r in ranks), "process_s": time.perf_counter() - t0}
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"), "model": "140m (134M float32 parameters, base + 3 experts)"}
    (HERE / "results_sharded_merge.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("| method | strategy | ranks | RSS before merge GiB | peak during merge GiB | merge s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['strategy']} | {r['world']} | {r['rss_before_gib']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['merge_s']:.1f} |")


if __name__ == "__main__":
    main()
