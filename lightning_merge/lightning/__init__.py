"""The PyTorch Lightning layer: callbacks that merge experts into a LightningModule, task wrappers
around Hugging Face models and data modules (the only part of lightning_merge that imports
``lightning``)."""

from .callback import MergeCallback, MergeSetupError
from .data import SyntheticTokensDataModule, TextClassificationDataModule
from .diagnostics import group_of
from .ranks import split_tasks
from .search import MergeSearch
from .search_alpha import DPPAAlphaSearch
from .tasks import CausalLM, SequenceClassifier

__all__ = [
    "CausalLM",
    "DPPAAlphaSearch",
    "MergeCallback",
    "MergeSearch",
    "MergeSetupError",
    "SequenceClassifier",
    "SyntheticTokensDataModule",
    "TextClassificationDataModule",
    "group_of",
    "split_tasks",
]
