"""Learned and data-aware merges: AdaMerging and DAM coefficients trained as a LightningModule
(:class:`LearnedMerge`), and Sens-Merging's sensitivity-guided per-layer weights for the existing
methods (:func:`compute_sens_factors`, :class:`SensMergeCallback`, :class:`SensScaled`), and RegMean,
RegMean++ and Fisher merging from statistics collected on the run's data (:class:`RegMeanMergeCallback`,
:class:`FisherMergeCallback`, :class:`MergeStatistics`, the methods :class:`RegMean` and :class:`Fisher`)."""

from .bank import ExpertBank
from .coefficients import Coefficients, Slot, classify
from .combine import Combine, combine
from .data import PerTaskTextDataModule, PerTaskTokensDataModule
from .module import LearnedMerge
from .objectives import dam_kl, entropy, l1_penalty, l2_penalty, similarity_penalty, task_loss
from .regmean import MergeStatistics, fisher_average, regmean_solve
from .regmean_callback import FisherMergeCallback, RegMeanMergeCallback
from .regmean_collect import collect_fishers, collect_grams
from .regmean_methods import Fisher, RegMean
from .sens import SensFactors, compute_sens_factors, sens_factors, sens_statistics
from .sens_callback import SensMergeCallback, SensScaled

__all__ = [
    "Coefficients",
    "Combine",
    "ExpertBank",
    "Fisher",
    "FisherMergeCallback",
    "LearnedMerge",
    "MergeStatistics",
    "PerTaskTextDataModule",
    "PerTaskTokensDataModule",
    "RegMean",
    "RegMeanMergeCallback",
    "SensFactors",
    "SensMergeCallback",
    "SensScaled",
    "Slot",
    "classify",
    "collect_fishers",
    "collect_grams",
    "combine",
    "compute_sens_factors",
    "dam_kl",
    "entropy",
    "fisher_average",
    "l1_penalty",
    "l2_penalty",
    "regmean_solve",
    "sens_factors",
    "sens_statistics",
    "similarity_penalty",
    "task_loss",
]
