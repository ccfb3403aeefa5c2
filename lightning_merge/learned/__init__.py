"""Learned and data-aware merges: AdaMerging and DAM coefficients trained as a LightningModule
(:class:`LearnedMerge`), and Sens-Merging's sensitivity-guided per-layer weights for the existing
methods (:func:`compute_sens_factors`, :class:`SensMergeCallback`, :class:`SensScaled`)."""

from .bank import ExpertBank
from .coefficients import Coefficients, Slot, classify
from .combine import Combine, combine
from .data import PerTaskTextDataModule, PerTaskTokensDataModule
from .module import LearnedMerge
from .objectives import dam_kl, entropy, l1_penalty, l2_penalty, similarity_penalty, task_loss
from .sens import SensFactors, compute_sens_factors, sens_factors, sens_statistics
from .sens_callback import SensMergeCallback, SensScaled

__all__ = [
    "Coefficients",
    "Combine",
    "ExpertBank",
    "LearnedMerge",
    "PerTaskTextDataModule",
    "PerTaskTokensDataModule",
    "SensFactors",
    "SensMergeCallback",
    "SensScaled",
    "Slot",
    "classify",
    "combine",
    "compute_sens_factors",
    "dam_kl",
    "entropy",
    "l1_penalty",
    "l2_penalty",
    "sens_factors",
    "sens_statistics",
    "similarity_penalty",
    "task_loss",
]
