"""Fused operations of S4Rec: Sinkhorn clustering targets, InfoNCE with prototype negatives, and
the full-item softmax loss with its ranking and top-k evaluation ops.

Importable without a GPU and without Triton; ``reference`` holds the eager definitions.
"""

from s4rec_kernels.info_nce import info_nce_proto
from s4rec_kernels.item_ranking import item_rank, item_topk
from s4rec_kernels.item_softmax import item_softmax_ce
from s4rec_kernels.sinkhorn import sinkhorn

__all__ = ["sinkhorn", "info_nce_proto", "item_softmax_ce", "item_rank", "item_topk"]
