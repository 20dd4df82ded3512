"""SASRec encoder, the S4Rec heads (prototypes, head/tail adversary) and padding-free batching.

Sequences are left-padded with item 0. Positions are counted from the right, so the newest item
always has position max_len - 1: a sequence padded to 50 or trimmed to its own length gets the same
encoding, which is what lets a batch be cut into length buckets without changing the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import bucketize, pad_left


@dataclass
class Packed:
    """A batch of sequences cut into length buckets, each padded only to its longest member."""

    groups: List[Tuple[Tensor, Tensor]]  # (rows (b,), seqs (b, l)) per bucket; rows index the batch
    targets: Optional[List[Tensor]]  # per bucket (b, l) next-item ids (0 = no target), or None
    negatives: Optional[List[Tensor]]  # per bucket (b, l) one negative item id per target, or None
    size: int  # sequences in the batch
    n_real: int  # item positions that are not padding
    n_encoded: int  # positions the encoder runs over

    @property
    def padding_share(self) -> float:
        return 1.0 - self.n_real / max(self.n_encoded, 1)


def pack(seqs: Sequence[np.ndarray], max_len: int, max_pad: float, device,
         targets: Optional[Sequence[np.ndarray]] = None,
         negatives: Optional[Sequence[np.ndarray]] = None) -> Packed:
    """Cut each sequence to its last max_len items and group them by length.

    `targets` and `negatives`, when given, are aligned with `seqs` position by position and padded
    the same way.
    An empty sequence becomes a single padding position (it is encoded, but has no target).
    """
    lengths = np.array([min(len(s), max_len) for s in seqs], dtype=np.int64)
    groups = []
    tgt_groups = [] if targets is not None else None
    neg_groups = [] if negatives is not None else None
    n_encoded = 0
    for rows in bucketize(lengths, max_pad):
        width = max(int(lengths[rows].max()), 1)
        n_encoded += width * len(rows)
        batch = pad_left([seqs[r] for r in rows], width)
        groups.append((torch.as_tensor(rows, device=device),
                       torch.as_tensor(batch, device=device)))
        if targets is not None:
            tgt_groups.append(torch.as_tensor(pad_left([targets[r] for r in rows], width),
                                              device=device))
        if negatives is not None:
            neg_groups.append(torch.as_tensor(pad_left([negatives[r] for r in rows], width),
                                              device=device))
    return Packed(groups, tgt_groups, neg_groups, len(seqs), int(lengths.sum()), n_encoded)


class Block(nn.Module):
    """Post-LayerNorm transformer block: attention, then a GELU feed-forward, each with a residual."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-12)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm2 = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(  # (b, heads, l, d / heads)
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        att = att.transpose(1, 2).reshape(b, l, d)
        x = self.norm1(x + self.drop(self.proj(att)))
        return self.norm2(x + self.drop(self.ff(x)))


class SASRec(nn.Module):
    """Item + position embeddings, LayerNorm, dropout, causal self-attention blocks."""

    def __init__(self, n_items: int, hidden: int = 64, heads: int = 2, layers: int = 2,
                 dropout: float = 0.5, max_len: int = 50):
        super().__init__()
        self.n_items, self.max_len = n_items, max_len
        self.mask_id = n_items + 1  # the augmentations' mask token; never a softmax candidate
        self.item_emb = nn.Embedding(n_items + 2, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(layers))
        self.apply(_init_weights)

    def item_table(self) -> Tensor:
        """Embeddings of the real items 1..n_items, as rows 0..n_items-1 (V, d); with a sharded
        table (s4rec.sharded_items), this rank's rows of it."""
        if hasattr(self.item_emb, "item_table"):
            return self.item_emb.item_table()
        return self.item_emb.weight[1:self.n_items + 1]

    def forward(self, seqs: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        """seqs (b, l) left-padded item ids, l <= max_len -> hidden states (b, l, d). `emb`, when
        given, is the item embedding of seqs (b, l, d), looked up already."""
        b, l = seqs.shape
        pos = torch.arange(self.max_len - l, self.max_len, device=seqs.device)
        emb = self.item_emb(seqs) if emb is None else emb
        x = self.drop(self.norm(emb + self.pos_emb(pos)))  # (b, l, d)
        valid = seqs != 0
        causal = torch.ones(l, l, dtype=torch.bool, device=seqs.device).tril()
        # a query sees earlier real items; a padding query sees itself only, so no row is empty
        mask = (causal & valid[:, None, None, :]) | torch.eye(l, dtype=torch.bool, device=seqs.device)
        for block in self.blocks:
            x = block(x, mask)  # (b, l, d)
        return x

    def encode(self, packed: Packed) -> Tuple[Tensor, List[Tensor]]:
        """Encode a packed batch -> (z (B, d) the last position of every sequence, per-bucket H)."""
        seqs = [s for _, s in packed.groups]
        # a sharded table looks up every bucket's items in one collective over the ranks
        embed_groups = getattr(self.item_emb, "embed_groups", None)
        embs = embed_groups(seqs) if embed_groups else [None] * len(seqs)
        hidden = [self(s, e) for s, e in zip(seqs, embs)]  # (b, l, d) each
        order = torch.cat([rows for rows, _ in packed.groups])
        last = torch.cat([h[:, -1] for h in hidden])  # (B, d) in bucket order
        z = last[torch.argsort(order)]  # (B, d) in batch order
        return z, hidden


class GradReverse(torch.autograd.Function):
    """Identity forward; the gradient's sign flips on the way back (Ganin and Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


PROJ_HEADS = ("none", "linear", "mlp")


def projection_head(kind: str, d: int) -> nn.Module:
    """The map from z to the space of the self-supervised terms (SimCLR's projection head, Chen et
    al. 2020): "none" (identity, no parameters), "linear", or "mlp" (Linear, GELU, Linear)."""
    if kind == "none":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(d, d)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
    raise ValueError(f"proj_head must be one of {', '.join(PROJ_HEADS)}, got {kind!r}")


class S4Rec(nn.Module):
    """SASRec encoder + K prototypes for online clustering + a head/tail classifier, and an optional
    projection head between z and the clustering, contrast and distillation terms."""

    def __init__(self, n_items: int, hidden: int = 64, heads: int = 2, layers: int = 2,
                 dropout: float = 0.5, max_len: int = 50, n_clusters: int = 128,
                 proj_head: str = "none"):
        super().__init__()
        self.encoder = SASRec(n_items, hidden, heads, layers, dropout, max_len)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(n_clusters, hidden), dim=1))
        self.adversary = nn.Linear(hidden, 2)
        self.project = projection_head(proj_head, hidden)
        self.project.apply(_init_weights)

    @classmethod
    def from_config(cls, n_items: int, cfg) -> "S4Rec":
        """The model a Config describes (s4rec.config.Config or anything with its fields)."""
        return cls(n_items, cfg.hidden, cfg.heads, cfg.layers, cfg.dropout, cfg.max_len,
                   cfg.n_clusters, getattr(cfg, "proj_head", "none"))

    def head_logits(self, z: Tensor) -> Tensor:
        """Head/tail logits (B, 2); the encoder receives the reversed gradient."""
        return self.adversary(GradReverse.apply(z))

    @torch.no_grad()
    def renormalize_prototypes(self) -> None:
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
