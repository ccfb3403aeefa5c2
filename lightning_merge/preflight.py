"""Checks before work, in one place: the arguments of a merge, the device, and the output location.

Everything here runs before a tensor is read or a byte written, and raises one
:class:`~lightning_merge.errors.ConfigError` (bad argument, unavailable device) or
:class:`~lightning_merge.errors.OutputError` (output is an input, not writable, no room) whose
message names the argument or path at fault and says what would fix it. :func:`merge_models`, the
``lightning-merge merge`` command and the learned-merge export all call these.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .methods.base import MergeMethod
from .methods.registry import get_method
from .sources.base import Source
from .targets.atomic import check_not_an_input, check_output_dir, check_writable_location

__all__ = [
    "check_experts",
    "check_method",
    "check_output",
    "check_seed",
    "input_paths",
    "resolve_device",
]

_DEVICE_HINT = "use 'cpu', 'cuda', 'cuda:N' or 'mps'"


def _shown(arg: str, value: Any) -> str:
    return f"{arg} {value}" if arg.startswith("--") else f"{arg}={value!r}"


def resolve_device(device: Any, arg: str = "device") -> torch.device:
    """Parse ``device`` and check that this machine has it.

    ``'gpu'`` is answered with a hint to write ``'cuda'``; ``'cuda'`` on a CPU-only build of torch,
    with no visible GPU, or with an index past the GPU count, and ``'mps'`` off Apple silicon, are
    refused with the reason."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        if device.strip().lower().startswith("gpu"):
            raise ConfigError(f"{_shown(arg, device)} is not a torch device name; for an NVIDIA GPU write "
                              f"'cuda' (or 'cuda:N'); {_DEVICE_HINT}")
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"{_shown(arg, device)} is not a torch device; {_DEVICE_HINT}") from None
    else:
        raise ConfigError(f"{arg} must be a string or torch.device, got {type(device).__name__} {device!r}; "
                          f"{_DEVICE_HINT}")
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ConfigError(f"{_shown(arg, device)}: this torch build ({torch.__version__}) has no CUDA support; "
                              "install a CUDA build of torch, or use 'cpu'")
        if not torch.cuda.is_available():
            raise ConfigError(f"{_shown(arg, device)}: no CUDA GPU is visible (torch.cuda.is_available() is False; "
                              "check the driver and CUDA_VISIBLE_DEVICES), or use 'cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{_shown(arg, device)}: this machine has {count} visible CUDA GPU(s) "
                              f"(cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{_shown(arg, device)}: MPS (Apple silicon) is not available on this machine; use 'cpu'")
    elif dev.type != "cpu":
        module = getattr(torch, dev.type, None)
        available = getattr(module, "is_available", None)
        if not (callable(available) and available()):
            raise ConfigError(f"{_shown(arg, device)}: device type '{dev.type}' is not available here; {_DEVICE_HINT}")
    return dev


def check_method(method: Any) -> MergeMethod:
    """A :class:`MergeMethod` instance as is; a name through :func:`get_method`; a class or anything
    else is refused with the fix."""
    if isinstance(method, MergeMethod):
        return method
    if isinstance(method, str):
        return get_method(method)
    if isinstance(method, type) and issubclass(method, MergeMethod):
        raise ConfigError(f"method={method.__name__} is the class; pass an instance, e.g. "
                          f"method={method.__name__}() with its parameters, or the name '{method.name}'")
    raise ConfigError(f"method must be a merge method such as Ties(density=0.2) or a name such as 'ties', "
                      f"got {type(method).__name__} {method!r}")


def check_experts(experts: Any) -> list[Any]:
    """``experts`` must be a list (or tuple) of model specs; one path or one model is refused,
    since a string would otherwise be read character by character."""
    one = isinstance(experts, (str, os.PathLike, Mapping, nn.Module, Source))
    if one:
        shown = f"'{os.fspath(experts)}'" if isinstance(experts, (str, os.PathLike)) else type(experts).__name__
        raise ConfigError(f"experts must be a list of models, got a single {shown}; pass experts=[{shown}]"
                          if isinstance(experts, (str, os.PathLike)) else
                          f"experts must be a list of models, got a single {shown}; wrap it in a list")
    if not isinstance(experts, Sequence) or isinstance(experts, (bytes, bytearray)):
        raise ConfigError(f"experts must be a list of models (paths, modules, state dicts), got "
                          f"{type(experts).__name__}")
    if not experts:
        raise ConfigError("no experts given: pass at least one fine-tuned model or adapter")
    return list(experts)


def check_seed(seed: Any, arg: str = "seed") -> int:
    """An integer (``bool`` and floats are refused)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"{arg} must be an integer, got {type(seed).__name__} {seed!r}")
    return int(seed)


def check_flag(value: Any, arg: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{arg} must be True or False, got {type(value).__name__} {value!r}")
    return value


def input_paths(specs: Sequence[Any]) -> list[Path]:
    """The files and folders behind model specs: paths as given, and the paths a :class:`Source`
    reads from (``path``, ``folder``, ``config_dir`` and, for aligned views, its inner source's)."""
    found: list[Path] = []
    for spec in specs:
        if isinstance(spec, (str, os.PathLike)):
            found.append(Path(spec).expanduser())
        elif isinstance(spec, Source):
            src: Any = spec
            while src is not None:
                for attr in ("path", "folder", "config_dir"):
                    value = getattr(src, attr, None)
                    if isinstance(value, (str, os.PathLike)):
                        found.append(Path(value).expanduser())
                src = getattr(src, "inner", None)
    return found


def check_output(out: Any, inputs: Sequence[Any], overwrite: bool) -> None:
    """The output path is not an input (nor inside one, nor holding one), its location is writable,
    and it is absent or empty unless ``overwrite``."""
    check_not_an_input(out, input_paths(inputs))
    check_writable_location(out)
    check_output_dir(out, overwrite)
