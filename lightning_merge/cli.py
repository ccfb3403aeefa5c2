"""The ``lightning-merge`` command.

``lightning-merge merge CONFIG OUT [--device DEV] [--seed N] [--out-dtype DTYPE] [--overwrite]
[--progress/--no-progress]`` reads a mergekit YAML (see :mod:`lightning_merge.mergekit`)
and writes the merged Hugging Face folder ``OUT``. Logs go to stderr (INFO); one summary line
goes to stdout at the end. A bad input (any :class:`~lightning_merge.errors.MergeError`) prints one
``lightning-merge: error: ...`` line to stderr, exits with status 2 and leaves no output folder.

The training subcommands (``fit``, ``validate``, ``test``, ``predict``) belong to the LightningCLI
integration; until it is installed they answer with a clear message and status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import Interrupted, MergeError, cli_message

PROG = "lightning-merge"
TRAINING_COMMANDS = ("fit", "validate", "test", "predict")
#: module providing ``main(argv)`` for the LightningCLI subcommands (added by another issue)
LIGHTNING_CLI_MODULE = "lightning_merge.lightning_cli"

log = logging.getLogger("lightning_merge.cli")


def say(message: str, stream=None) -> None:
    """Write one line of the command's own output (its result or its error) to ``stream``."""
    (stream or sys.stdout).write(message + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge fine-tuned models and LoRA adapters.",
        epilog=f"training subcommands ({', '.join(TRAINING_COMMANDS)}) are provided by the LightningCLI "
        "integration",
    )
    sub = parser.add_subparsers(dest="command", metavar="{merge," + ",".join(TRAINING_COMMANDS) + "}")
    merge = sub.add_parser(
        "merge",
        help="merge models offline from a mergekit-style YAML config",
        description="Merge models from a mergekit-style YAML config into a Hugging Face folder.",
    )
    merge.add_argument("config", help="mergekit-style YAML (merge_method, base_model, models, parameters)")
    merge.add_argument("out", help="output folder (written atomically)")
    merge.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu, cuda, cuda:1, ... "
                       "(default: cpu)")
    merge.add_argument("--seed", type=int, default=None,
                       help="seed of the random methods (DARE, DELLA); default: the YAML's seed, else 0")
    merge.add_argument("--out-dtype", default=None,
                       help="dtype of the written tensors (float32, bfloat16, float16); overrides the YAML")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merge.add_argument("--format", dest="out_format", choices=("hf", "safetensors", "peft"), default=None,
                       help="hf: a Hugging Face folder (default); safetensors: one file; peft: a LoRA "
                       "adapter of the merged delta (truncated SVD, see --adapter-rank)")
    merge.add_argument("--adapter-rank", type=int, default=16, help="LoRA rank for --format peft (default 16)")
    merge.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show a progress bar (default: only for long merges in a terminal)")
    return parser


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _not_the_summary(record: logging.LogRecord) -> bool:
    """The library's own summary line is left out: the command prints its summary on stdout."""
    from .api import SUMMARY

    return not getattr(record, SUMMARY, False)


def _count_tensors(out: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in [out] if out.is_file() else sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            n += len(list(fh.keys()))
    return n


def _merge(args: argparse.Namespace) -> int:
    from . import preflight
    from .applied import applied_values
    from .mergekit import parse_config
    from .mergekit.layered import LayeredRecipe
    from .mergekit.recipe import tensor_names

    t0 = time.perf_counter()
    out = Path(args.out)
    preflight.resolve_device(args.device, "--device")
    if args.seed is not None:
        preflight.check_seed(args.seed, "--seed")
    if args.adapter_rank < 1:
        raise MergeError(f"--adapter-rank must be a positive integer, got {args.adapter_rank}")
    recipe = parse_config(args.config)
    donor = recipe.base if recipe.base is not None else recipe.experts[0]
    preflight.check_output(out, [donor, *recipe.experts, args.config], args.overwrite)
    if isinstance(recipe, LayeredRecipe):
        log.info("%s: %d layers from %d slice(s) with %s", args.config, recipe.n_layers, len(recipe.parts),
                 recipe.merge_method)
        lines = recipe.summary()
    else:
        names = tensor_names(donor) if recipe.tensor_params is not None else []
        log.info("%s: %s (%s) with %d expert(s) %s on base '%s'", args.config, recipe.merge_method,
                 type(recipe.method).__name__, len(recipe.experts), recipe.experts, recipe.base)
        lines = applied_values(recipe, names)
    for line in lines:
        log.info("  %s", line)
    recipe.merge(out, device=args.device, seed=args.seed, out_dtype=args.out_dtype,
                 overwrite=args.overwrite, progress=args.progress, out_format=args.out_format,
                 adapter_rank=args.adapter_rank)
    seconds = time.perf_counter() - t0
    say(f"{PROG}: merged {_count_tensors(out)} tensors with {recipe.merge_method} "
        f"({type(recipe.method).__name__}) in {seconds:.2f} s -> {out}")
    return 0


def _training(command: str, argv: list[str]) -> int:
    import importlib

    try:
        mod = importlib.import_module(LIGHTNING_CLI_MODULE)
    except ModuleNotFoundError as e:
        if e.name != LIGHTNING_CLI_MODULE:
            raise
        say(f"{PROG}: error: '{command}' (LightningCLI training) is not available in this version; "
              f"use '{PROG} merge CONFIG OUT' to merge offline", sys.stderr)
        return 2
    return int(mod.main([command, *argv]) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-merge``; returns the exit status (0 ok, 2 bad input)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in TRAINING_COMMANDS:
        return _training(args_list[0], args_list[1:])

    parser = _parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return int(e.code or 0)
    if args.command is None:
        parser.print_usage(sys.stderr)
        say(f"{PROG}: error: a subcommand is required: merge, or one of {', '.join(TRAINING_COMMANDS)}", sys.stderr)
        return 2

    pkg_log = logging.getLogger("lightning_merge")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    handler.addFilter(_not_the_summary)
    old_level, old_propagate = pkg_log.level, pkg_log.propagate
    pkg_log.addHandler(handler)
    pkg_log.setLevel(logging.INFO)
    pkg_log.propagate = False  # this handler reports; an application's root handler would repeat it
    from .targets.atomic import interrupt_on_termination

    try:
        with interrupt_on_termination():
            return _merge(args)
    except MergeError as e:
        say(f"{PROG}: error: {cli_message(e)}", sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else 2
        say(f"{PROG}: interrupted ({'SIGINT' if signum == 2 else str(e).split()[-1]}); no output written",
            sys.stderr)
        return 128 + signum
    except Exception as e:  # a bug, not bad input: one line, the traceback on request
        if os.environ.get("LIGHTNING_MERGE_TRACEBACK"):
            raise
        say(f"{PROG}: error: internal error {type(e).__name__}: {' '.join(str(e).split())} (a bug in "
            f"{PROG}; no output was written; rerun with LIGHTNING_MERGE_TRACEBACK=1 for the traceback "
            "and report it)", sys.stderr)
        return 1
    finally:
        pkg_log.removeHandler(handler)
        pkg_log.setLevel(old_level)
        pkg_log.propagate = old_propagate


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main"]
