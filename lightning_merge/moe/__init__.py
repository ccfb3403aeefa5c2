"""Mixture-of-experts merging: M-SMoE (routing-guided expert merging) and MC-SMoE (then compression).

"Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy" (Li et al.,
ICLR 2024), for the fused-expert MoE models of transformers 5 (Mixtral, Qwen2-MoE, Qwen3-MoE):

* :func:`collect_routing` / :class:`RoutingStatistics`: activation frequencies and router-logit
  similarities from hooks on the routers (all-reduced under DDP);
* :func:`msmoe_merge`: align, group around dominant experts and merge by frequency to
  ``num_experts`` per block; :func:`drop_experts`: the pruning baseline;
* :func:`mcsmoe_compress` / :func:`mcsmoe`: low-rank plus structured-sparse experts;
* :class:`MoEMergeCallback`: the same inside a Lightning run, calibrated on its own dataloaders.

The math and every choice are in ``docs/moe.md``.
"""

from .arch import Expert, MoELayer, moe_layers
from .callback import MoEMergeCallback
from .compress import Factor, MoECompression, load_factors, low_rank_sparse, mcsmoe, mcsmoe_compress
from .grouping import Groups, group_experts
from .merge import LayerPlan, MoEMerge, drop_experts, msmoe_merge, save_moe
from .stats import RoutingStatistics, collect_routing

__all__ = ["Expert", "Factor", "Groups", "LayerPlan", "MoECompression", "MoELayer", "MoEMerge", "MoEMergeCallback",
           "RoutingStatistics", "collect_routing", "drop_experts", "group_experts", "load_factors", "low_rank_sparse",
           "mcsmoe", "mcsmoe_compress", "moe_layers", "msmoe_merge", "save_moe"]
