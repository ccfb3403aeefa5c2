"""The ``--tiny`` stand-ins (synthetic data in the corpora's layout, a word-level tokenizer and a tiny
random Llama): moved to :mod:`lightning_merge.examples.smollm2` (``--tiny``); re-exported here under
the benchmark's names."""

from lightning_merge.examples.smollm2 import FILLER, LABELS  # noqa: F401
from lightning_merge.examples.smollm2 import write_tiny_base as write_base  # noqa: F401
from lightning_merge.examples.smollm2 import write_tiny_data as write_data  # noqa: F401
