"""A Hugging Face folder as a meta-device skeleton, its weights read when the module is set up.

:class:`~lightning_merge.learned.LearnedMerge` builds the architecture of a model folder in
``__init__`` with every *parameter* on the meta device (shapes and dtypes only, no memory; the
trick of accelerate's ``init_empty_weights(include_buffers=False)``: ``nn.Module.register_parameter``
patched while the model is built). Buffers stay real: the ones ``__init__`` computes (rotary
``inv_freq``) are not in the checkpoint. The weights are read later:

* not sharded (:func:`load_weights`): every parameter whole, from the folder's safetensors, in
  the skeleton's dtype (float32), on CPU (or where the module was moved before, see
  :class:`Placement`), tied parameters once; the same tensors ``from_pretrained(folder,
  dtype=torch.float32)`` loads;
* sharded (:func:`load_local_rows`, after ``fully_shard``): the DTensor shards are allocated on
  the rank's device (``to_empty``, the real buffers kept) and each rank reads only the rows
  ``start:stop`` of every parameter that its shard holds (``Source.get_rows``: a positional read
  of those bytes). No rank ever holds the whole model.

The skeleton is used only where it gives exactly what ``from_pretrained`` gives (:func:`build_skeleton`
says why not otherwise, and the caller loads the model whole): the weights are safetensors
(``model.safetensors`` or its index), ``model_kwargs`` are config fields (``num_labels``, ...) or
``attn_implementation``, the model code is transformers' own (no ``auto_map``), the checkpoint
holds every parameter and persistent buffer of the architecture under its own name with its shape
(a head that ``from_pretrained`` would initialise at random, e.g. ``num_labels`` on a causal-LM
checkpoint, needs the full load), and transformers converts none of its keys on load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..sources.base import Source
from ..sources.resolve import open_source
from ..targets.module import is_dtensor, local_part

log = logging.getLogger(__name__)

__all__ = ["Placement", "build_skeleton", "has_meta_parameters", "load_local_rows", "load_weights",
           "parameters_on_meta"]

#: model_kwargs that from_pretrained consumes itself (the skeleton could not replay them)
_LOADER_ARGS = frozenset({
    "adapter_kwargs", "adapter_name", "cache_dir", "config", "device_map", "device_mesh", "disable_mmap",
    "distributed_config", "dtype", "force_download", "gguf_file", "ignore_mismatched_sizes", "kernel_config",
    "key_mapping", "local_files_only", "max_memory", "offload_buffers", "offload_folder", "output_loading_info",
    "proxies", "quantization_config", "revision", "state_dict", "subfolder", "token", "torch_dtype", "tp_plan",
    "tp_size", "trust_remote_code", "use_kernels", "use_safetensors", "variant", "weights_only"})
#: model_kwargs the skeleton passes on to ``_from_config`` as from_pretrained does
_IMPL_ARGS = ("attn_implementation", "experts_implementation")


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within: every parameter a module registers is moved to the meta device (its class,
    ``requires_grad`` and attributes kept); buffers and plain tensors stay where they are. A
    parameter already on meta is kept as it is, so ties made while building stay ties."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            attrs = dict(p.__dict__)
            meta = type(p)(p.to("meta"), requires_grad=p.requires_grad)
            meta.__dict__.update(attrs)
            module._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def has_meta_parameters(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _checkpoint_keys(model: nn.Module, src: Source) -> tuple[dict[int, str], list[str]]:
    """For every distinct parameter (by identity) the first of its names the checkpoint holds, and
    the problems: parameters or persistent buffers missing from it, or of another shape."""
    names: dict[int, tuple[Tensor, list[str]]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), (p, []))[1].append(n)
    keys: dict[int, str] = {}
    problems: list[str] = []
    for pid, (p, aliases) in names.items():
        key = next((n for n in aliases if n in src), None)
        if key is None:
            problems.append(f"'{aliases[0]}' is not in the checkpoint")
        elif tuple(src.shape(key)) != tuple(p.shape):
            problems.append(f"'{key}' has shape {list(src.shape(key))} there, the architecture {list(p.shape)}")
        else:
            keys[pid] = key
    for n, b in _persistent_buffers(model):
        if n not in src:
            problems.append(f"buffer '{n}' is not in the checkpoint")
        elif tuple(src.shape(n)) != tuple(b.shape):
            problems.append(f"buffer '{n}' has shape {list(src.shape(n))} there, the architecture {list(b.shape)}")
    return keys, problems


def _persistent_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    out = []
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, b))
    return out


def _converted_key(model: nn.Module, keys: list[str]) -> str | None:
    """A checkpoint key that transformers would rename or convert on load, if any."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # a transformers without conversion mappings renames nothing
        return None
    transforms = get_model_conversion_mapping(model)
    for key in keys:
        for t in transforms:
            if t.rename_source_key(key)[1] is not None:
                return key
    return None


def _weights_problem(path: Path) -> str | None:
    present = [n for n in ("model.safetensors", "model.safetensors.index.json") if (path / n).is_file()]
    if len(present) == 1:
        return None
    if present:
        return "the folder holds both model.safetensors and model.safetensors.index.json"
    return "its weights are not safetensors (row reads need model.safetensors or its index)"


def build_skeleton(path: Path, cls: Any, model_kwargs: Mapping[str, Any] | None) -> tuple[nn.Module | None, str]:
    """The architecture of the folder ``path`` (loaded with the transformers class ``cls``) with
    its parameters on meta, in eval mode as ``from_pretrained`` leaves it; or ``(None, why)`` when
    only ``from_pretrained`` gives the model exactly (see the module doc)."""
    import transformers

    why = _weights_problem(path)
    if why:
        return None, why
    kw = dict(model_kwargs or {})
    impl = {k: kw.pop(k) for k in _IMPL_ARGS if k in kw}
    config_cls = getattr(cls, "config_class", None) or transformers.AutoConfig
    try:
        config, unused = config_cls.from_pretrained(str(path), return_unused_kwargs=True, **kw)
    except Exception as e:  # from_pretrained reports it the way users know
        return None, f"its config could not be read for a skeleton ({type(e).__name__}: {e})"
    other = sorted(k for k in kw if k in _LOADER_ARGS or k in unused or not hasattr(config, k))
    if other:
        return None, f"model_kwargs {other} are from_pretrained arguments, not config fields"
    if getattr(config, "auto_map", None):
        return None, "its config names remote model code (auto_map)"
    config.name_or_path = str(path)
    build = getattr(cls, "_from_config", None) or cls.from_config
    src = open_source(path)
    try:
        try:
            with parameters_on_meta():
                model = build(config, dtype=torch.float32, **impl)
        except Exception as e:  # e.g. an __init__ that computes with its parameters
            return None, f"the architecture could not be built on the meta device ({type(e).__name__}: {e})"
        model.eval()
        keys, problems = _checkpoint_keys(model, src)
        if problems:
            return None, f"the checkpoint lacks parts of the architecture: {'; '.join(problems[:3])}"
        try:
            converted = _converted_key(model, src.keys())
        except Exception as e:  # a conversion mapping this code does not know how to ask
            return None, f"its checkpoint conversions could not be checked ({type(e).__name__}: {e})"
        if converted is not None:
            return None, f"transformers converts its checkpoint key '{converted}' on load"
    finally:
        src.close()
    if getattr(model, "can_generate", lambda: False)():
        _generation_config(model, path)
    return model, ""


def _generation_config(model: nn.Module, path: Path) -> None:
    """The generation config ``from_pretrained`` reads (generation_config.json, else config.json)."""
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except OSError:
        model.generation_config = GenerationConfig.from_pretrained(str(path), config_file_name="config.json",
                                                                   _from_model_config=True)


def _open(path: str | None) -> Source:
    if path is None:
        raise ConfigError("LearnedMerge: the model has parameters on the meta device and no folder to read them "
                          "from; pass the model's Hugging Face folder as model=..., or load its weights first")
    return open_source(path)


@torch.no_grad()
def _load_buffers(model: nn.Module, src: Source) -> None:
    for n, b in _persistent_buffers(model):
        if n in src:
            b.copy_(src.get(n))


@torch.no_grad()
def load_weights(model: nn.Module, path: str | None, device: torch.device | str = "cpu") -> None:
    """Every meta parameter of ``model`` replaced by its checkpoint tensor from the folder
    ``path`` (whole, on ``device``, in the parameter's dtype; tied parameters stay one
    parameter); persistent buffers the checkpoint holds are copied in."""
    if not has_meta_parameters(model):
        return
    src = _open(path)
    try:
        keys, problems = _checkpoint_keys(model, src)
        if problems:
            raise ConfigError(f"LearnedMerge: the folder '{path}' no longer fits the model: {'; '.join(problems[:3])}")
        done: dict[int, nn.Parameter] = {}
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                new = done.get(id(p))
                if new is None:
                    attrs = dict(p.__dict__)
                    new = type(p)(src.get(keys[id(p)]).to(device=device, dtype=p.dtype), requires_grad=p.requires_grad)
                    new.__dict__.update(attrs)
                    done[id(p)] = new
                mod._parameters[name] = new
        _load_buffers(model, src)
    finally:
        src.close()
    log.info("LearnedMerge: read the %d parameters of '%s' into the meta-device model", len(done), path)


@torch.no_grad()
def load_local_rows(model: nn.Module, path: str | None, device: torch.device) -> int:
    """After ``fully_shard`` of a meta skeleton: allocate the shards on ``device`` (``to_empty``,
    the real buffers kept) and fill each with its rows of the folder's tensors (row reads).
    Returns the tensor bytes this rank read."""
    import torch.distributed as dist

    from ..lightning.sharded import local_box

    src = _open(path)
    try:
        keys, problems = _checkpoint_keys(model, src)
        if problems:
            raise ConfigError(f"LearnedMerge: the folder '{path}' no longer fits the model: {'; '.join(problems[:3])}")
        buffers = [(mod, n, b) for mod in model.modules() for n, b in mod._buffers.items() if b is not None]
        model.to_empty(device=device)
        for mod, n, b in buffers:
            mod._buffers[n] = b.to(device)
        keys, _ = _checkpoint_keys(model, src)  # the parameters after to_empty
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        read = 0
        for p in model.parameters():
            key, local = keys[id(p)], local_part(p)
            if not local.numel():
                continue
            if is_dtensor(p) and p.ndim:
                placement = p.placements[0]
                if not placement.is_shard() or placement.dim % p.ndim != 0:
                    raise ConfigError(f"LearnedMerge: parameter '{key}' is placed {placement}; reading a "
                                      "meta-device model supports FSDP2's row sharding (Shard(0))")
                box = local_box(p, rank, world)
                rows = src.get_rows(key, box[0].start, box[0].stop) if box is not None else None
            else:
                rows = src.get(key)
            if rows is not None:
                local.copy_(rows.to(dtype=local.dtype))
                read += rows.numel() * rows.element_size()
        _load_buffers(model, src)
    finally:
        src.close()
    return read


class Placement:
    """Where a skeleton's parameters go when they are read: moves and casts of the module before
    then (``.to()``, ``.cpu()``, Lightning's teardown after an early failure) leave its meta
    parameters on meta, cast to the dtype the call would give them, and remember the device
    (:meth:`wrap` of the function ``nn.Module._apply`` applies); :func:`load_weights` reads onto it."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def wrap(self, fn: Any) -> Any:
        def apply(t: Tensor) -> Tensor:
            if not t.is_meta:
                return fn(t)
            probe = fn(torch.empty((), dtype=t.dtype, device=self.device))  # the call on a real tensor like t
            self.device = probe.device
            return t.to(dtype=probe.dtype)

        return apply
