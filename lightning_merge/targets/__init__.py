"""Where merged tensors go: safetensors shards, Hugging Face folders, single files, PEFT adapters.

Every writer consumes a stream of ``(name, tensor)`` pairs (e.g. :func:`lightning_merge.engine.run_plan`)
and is atomic: output appears complete under its final name, or not at all.
"""

from .atomic import OutputExistsError, atomic_file, atomic_output_dir, check_output_dir
from .hf import COPIED_FILES, save_hf_folder
from .peft_adapter import LoraExportReport, save_lora_adapter
from .shards import DEFAULT_MAX_SHARD_BYTES, save_safetensors_shards, save_state_dict_file

__all__ = [
    "COPIED_FILES",
    "DEFAULT_MAX_SHARD_BYTES",
    "LoraExportReport",
    "OutputExistsError",
    "atomic_file",
    "atomic_output_dir",
    "check_output_dir",
    "save_hf_folder",
    "save_lora_adapter",
    "save_safetensors_shards",
    "save_state_dict_file",
]
