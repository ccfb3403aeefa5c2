"""``lightning-merge fit|validate|test|predict``: Lightning's ``LightningCLI`` for merge runs.

    lightning-merge fit --config recipes/ties.yaml [--trainer.max_epochs=1 ...]
    lightning-merge validate --config recipes/ties.yaml      # evaluate the merge alone
    lightning-merge fit --config recipes/ties.yaml --print_config > my.yaml

Any LightningModule and LightningDataModule can be named with ``class_path`` (subclass mode);
the ones made for merging live in :mod:`lightning_merge.lightning.tasks` and
:mod:`lightning_merge.lightning.data`. A :class:`~lightning_merge.MergeCallback` goes into
``trainer.callbacks``; its ``method`` is a method name (``method: ties`` with
``method_params: {density: 0.3}``) or a method class
(``method: {class_path: lightning_merge.Ties, init_args: {density: 0.3}}``).

The configuration is saved beside the logs (``config.yaml``, overwritten by a later run). Bad
input (any :class:`~lightning_merge.errors.MergeError`, e.g. a missing expert) prints one
``lightning-merge: error: ...`` line to stderr and returns 2.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

# importing the Lightning layer registers the merge methods for class_path specs (see MergeCallback)
from . import lightning as _lightning  # noqa: F401
from .cli import say
from .errors import MergeError

PROG = "lightning-merge"

__all__ = ["LightningMergeCLI", "main"]


class LightningMergeCLI(LightningCLI):
    """``LightningCLI`` in subclass mode for the model and the data, saving the config with overwrite."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": PROG})
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # lightning_merge.cli hands over its own argv explicitly, so LightningCLI's warning about
        # args given beside sys.argv (meant for scripts that pass both by mistake) does not apply
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)


def _merge_error(exc: BaseException) -> MergeError | None:
    """The :class:`MergeError` behind ``exc``: itself, or one that jsonargparse wrapped while
    instantiating a class (a callback's ``__init__`` raising inside a ``Union`` of types)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MergeError):
            return e
        todo += [e.__cause__, e.__context__]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run a ``LightningMergeCLI`` on ``argv`` (subcommand first); returns the exit status.

    0: done (also ``--help`` / ``--print_config``); 2: bad arguments or bad input.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    pkg_log = logging.getLogger("lightning_merge")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    old_level = pkg_log.level
    own_handler = not pkg_log.handlers and not logging.getLogger().handlers
    if own_handler:  # the merge summary is an INFO record; show it unless the application logs already
        pkg_log.addHandler(handler)
        if pkg_log.level == logging.NOTSET:
            pkg_log.setLevel(logging.INFO)
    try:
        LightningMergeCLI(args=args)
    except SystemExit as e:  # argparse / jsonargparse: --help, --print_config (0), usage errors (2)
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        say(str(e.code), sys.stderr)
        return 2
    except Exception as e:
        cause = _merge_error(e)
        if cause is None:
            raise
        say(f"{PROG}: error: {' '.join(str(cause).split())}", sys.stderr)
        return 2
    finally:
        if own_handler:
            pkg_log.removeHandler(handler)
            pkg_log.setLevel(old_level)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
