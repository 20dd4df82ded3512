"""The item table split by rows across the ranks of a torchrun run (`--shard-items`).

Rank r of W holds rows [start_r, stop_r) of the item table (item ids start_r + 1 .. stop_r), with
start_r = V r // W (uneven slices when W does not divide V). The table serves twice:

  output  the SR loss and the evaluation's ranking call the vocabulary-parallel ops
          (``shard=VocabShard(start, stop)``, s4rec_kernels.distributed): each rank scores every
          rank's rows against its own slice, and three N-sized reductions combine the slices.
  input   the encoder looks up the items of its sequences, and a rank's sequences name items of
          every slice, so the lookup is a collective. Forward: the ranks' ids are all-gathered,
          each rank fills the rows of the distinct ids it owns (zeros for the others) and one
          all-reduce sums them, so every rank reads each row from its owner, bit for bit (x + 0
          is exact). Backward: not a collective inside autograd. Each lookup keeps the gradient
          of its output, and after ``loss.backward()`` the trainer calls ``flush_grads``, which
          sums the gradient per distinct id on each rank, all-gathers (ids, gradients) and adds
          to the slice's gradient the rows it owns. Collectives issued from inside the backward
          would run in whatever order the autograd engine schedules them on each rank (the
          encoder's graph differs between ranks: other length buckets); issued after it, their
          order is the program's.

The padding row (id 0) is zero everywhere, as in ``nn.Embedding(padding_idx=0)``; the mask token
(id n_items + 1) is a (1, d) parameter held by every rank and all-reduced like the rest of the
model. The slice's gradient is complete on its rank (it holds every rank's contribution, from the
loss and from the lookups), so it is the one parameter whose gradient is not all-reduced.

Checkpoints keep the single-process layout: ``encoder.item_emb.weight`` of shape (V + 2, d), and
Adam's state in the single-process parameter order. ``full_model_state`` / ``full_optimizer_state``
gather the slices to rank 0 on save, ``load_full_state`` slices them on load, so a run resumes
with any number of ranks, sharded or not. Each rank builds the full model once at start-up (so its
initial weights are those of a single process of the same seed) and keeps its slice; a resume
reads the whole checkpoint on the host before slicing. Both need host memory for the full table
once; only the slice, its gradient and its Adam state stay on the device.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from s4rec_kernels import item_rank
from s4rec_kernels.distributed import VocabShard, gather_rows

from .config import ConfigError
from .data import history_csr, split_input, split_target
from .model import S4Rec, pack
from .precision import autocast, op_inputs

PREFIX = "encoder.item_emb."  # the item table's keys in a state dict


def item_slices(n_items: int, world: int) -> List[Tuple[int, int]]:
    """Rank r's rows [start, stop) of the item table: start = V r // W."""
    bounds = [n_items * r // world for r in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _row_sizes(n: int, group, device) -> List[int]:
    """Every rank's n, in rank order."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(t) for t in out]


class _Lookup(torch.autograd.Function):
    """The rows of ``ids`` (owned by any rank); the gradient is kept for ``flush_grads``."""

    @staticmethod
    def forward(ctx, weight, ids, table):
        ctx.table = table
        ctx.save_for_backward(ids)
        return table.fetch(ids)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        ctx.table.pending.append((ids, grad))
        return None, None, None


class ShardedItemEmbedding(nn.Module):
    """The item embedding of a rank: rows [start, stop) of the item table, plus the mask token."""

    def __init__(self, full: nn.Embedding, n_items: int, start: int, stop: int, group=None):
        super().__init__()
        if full.weight.shape[0] != n_items + 2:
            raise ValueError(f"expected the (n_items + 2, d) = ({n_items + 2}, d) item embedding, "
                             f"got {tuple(full.weight.shape)}")
        self.n_items, self.start, self.stop, self.group = n_items, start, stop, group
        self.shard = VocabShard(start, stop, group)
        self.weight = nn.Parameter(full.weight.detach()[1 + start:1 + stop].clone())  # (s, d)
        self.mask = nn.Parameter(full.weight.detach()[n_items + 1:n_items + 2].clone())  # (1, d)
        self.pending: List[Tuple[Tensor, Tensor]] = []  # (ids, gradient) of this step's lookups

    def item_table(self) -> Tensor:
        return self.weight  # (stop - start, d)

    def embed_groups(self, seqs: List[Tensor]) -> List[Tensor]:
        """(b, l, d) embeddings of each (b, l) tensor of ids, in one collective lookup."""
        ids = (torch.cat([s.reshape(-1) for s in seqs]) if seqs
               else torch.zeros(0, dtype=torch.int64, device=self.weight.device))
        rows = self.lookup(ids)  # (n, d)
        return [r.view(*s.shape, -1) for r, s in zip(rows.split([s.numel() for s in seqs]), seqs)]

    def lookup(self, ids: Tensor) -> Tensor:
        """(n,) item ids of this rank -> (n, d); every rank calls it together."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            rows = _Lookup.apply(self.weight, ids, self)
        else:
            rows = self.fetch(ids)
        return torch.where((ids == self.n_items + 1).unsqueeze(1), self.mask, rows)

    @torch.no_grad()
    def fetch(self, ids: Tensor) -> Tensor:
        """The rows of every rank's ids from their owners (no autograd); mask and padding: 0."""
        sizes = _row_sizes(ids.shape[0], self.group, ids.device)
        all_ids = gather_rows(ids, sizes, self.group)  # (N,)
        uniq, inverse = torch.unique(all_ids, return_inverse=True)
        rows = self._owned_rows(uniq)  # (u, d)
        dist.all_reduce(rows, group=self.group)  # one owner per id: the sum is the row
        offset = sum(sizes[:dist.get_rank(self.group)])
        return rows[inverse[offset:offset + ids.shape[0]]]

    def _local(self, ids: Tensor) -> Tuple[Tensor, Tensor]:
        """(row in the slice, owned?) of item ids."""
        local = ids - 1 - self.start
        return local, (local >= 0) & (local < self.stop - self.start)

    def _owned_rows(self, ids: Tensor) -> Tensor:
        local, owned = self._local(ids)
        out = self.weight.new_zeros(ids.shape[0], self.weight.shape[1])
        out[owned] = self.weight[local[owned]]
        return out

    @torch.no_grad()
    def flush_grads(self) -> None:
        """Add this step's lookup gradients to the slice's gradient; every rank calls it once
        after backward (with or without lookups of its own)."""
        d = self.weight.shape[1]
        if self.pending:
            ids = torch.cat([i for i, _ in self.pending])
            grads = torch.cat([g.reshape(-1, d) for _, g in self.pending]).to(self.weight.dtype)
        else:
            ids = torch.zeros(0, dtype=torch.int64, device=self.weight.device)
            grads = self.weight.new_zeros(0, d)
        self.pending = []
        real = (ids >= 1) & (ids <= self.n_items)  # padding and the mask token are not in the table
        uniq, inverse = torch.unique(ids[real], return_inverse=True)
        summed = grads.new_zeros(uniq.shape[0], d).index_add_(0, inverse, grads[real])  # (u, d)
        sizes = _row_sizes(uniq.shape[0], self.group, ids.device)
        all_ids = gather_rows(uniq, sizes, self.group)
        all_grads = gather_rows(summed, sizes, self.group)
        local, owned = self._local(all_ids)
        if self.weight.grad is None:
            self.weight.grad = torch.zeros_like(self.weight)
        self.weight.grad.index_add_(0, local[owned], all_grads[owned])


def shard_model(model: S4Rec, world: int, rank: int, group=None) -> ShardedItemEmbedding:
    """Replace the model's item embedding by this rank's slice of it (call before .to(device))."""
    start, stop = item_slices(model.encoder.n_items, world)[rank]
    emb = ShardedItemEmbedding(model.encoder.item_emb, model.encoder.n_items, start, stop, group)
    model.encoder.item_emb = emb
    return emb


def sharded(model: S4Rec) -> Optional[ShardedItemEmbedding]:
    emb = model.encoder.item_emb
    return emb if isinstance(emb, ShardedItemEmbedding) else None


def replicated_parameters(model: S4Rec) -> List[nn.Parameter]:
    """Every trainable parameter held whole by every rank (all but the table's slice)."""
    emb = sharded(model)
    return [p for p in model.parameters()
            if p.requires_grad and (emb is None or p is not emb.weight)]


# ----------------------------------------------------------------------------------------------
# Checkpoints in the single-process layout
# ----------------------------------------------------------------------------------------------


def _gather_table(emb: ShardedItemEmbedding, part: Tensor, mask: Tensor) -> Optional[Tensor]:
    """On rank 0 the (V + 2, d) table of every rank's ``part`` (a zero padding row first, the
    mask row last), on the host; None on the other ranks."""
    world, rank = dist.get_world_size(emb.group), dist.get_rank(emb.group)
    slices = item_slices(emb.n_items, world)
    longest = max(hi - lo for lo, hi in slices)
    padded = part.new_zeros(longest, part.shape[1])
    padded[:part.shape[0]] = part
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dst = 0 if emb.group is None else dist.get_global_rank(emb.group, 0)
    dist.gather(padded, parts, dst=dst, group=emb.group)
    if rank:
        return None
    rows = [p[:hi - lo].cpu() for p, (lo, hi) in zip(parts, slices)]
    return torch.cat([part.new_zeros(1, part.shape[1]).cpu(), *rows, mask.detach().cpu()])


def full_model_state(model: S4Rec) -> Optional[Dict[str, Tensor]]:
    """The model's state dict as a single process has it, on rank 0 (None elsewhere)."""
    emb = sharded(model)
    table = _gather_table(emb, emb.weight.detach(), emb.mask.detach())
    if table is None:
        return None
    out = {}
    for key, value in model.state_dict().items():
        if key == PREFIX + "weight":
            out[key] = table
        elif key != PREFIX + "mask":
            out[key] = value
    return out


def _names(model: S4Rec) -> Tuple[List[str], List[str]]:
    """Parameter names in the optimizer's order: this model's, and a single process's."""
    names = [n for n, _ in model.named_parameters()]
    return names, [n for n in names if n != PREFIX + "mask"]


def full_optimizer_state(model: S4Rec, optimizer) -> Optional[Dict]:
    """The optimizer's state dict in a single process's layout, on rank 0 (None elsewhere)."""
    emb = sharded(model)
    names, full_names = _names(model)
    local = optimizer.state_dict()
    if len(local["param_groups"]) != 1:
        raise ValueError("a sharded checkpoint expects one parameter group")
    state = local["state"]
    w_state = state.get(names.index(PREFIX + "weight"), {})
    m_state = state.get(names.index(PREFIX + "mask"), {})
    merged = {}
    for key in sorted(w_state):  # the same keys on every rank: they step together
        value = w_state[key]
        if torch.is_tensor(value) and value.shape == emb.weight.shape:
            merged[key] = _gather_table(emb, value, m_state[key])
        else:
            merged[key] = value
    if dist.get_rank(emb.group):
        return None
    out_state = {}
    for i, name in enumerate(full_names):
        if name == PREFIX + "weight":
            if merged:
                out_state[i] = merged
        elif names.index(name) in state:
            out_state[i] = state[names.index(name)]
    group = dict(local["param_groups"][0], params=list(range(len(full_names))))
    return {"state": out_state, "param_groups": [group]}


def load_full_state(model: S4Rec, optimizer, model_state: Dict[str, Tensor],
                    optimizer_state: Optional[Dict] = None) -> None:
    """Load single-process state dicts (a checkpoint) into this rank's sharded model."""
    emb = sharded(model)
    table = model_state[PREFIX + "weight"]
    if table.shape != (emb.n_items + 2, emb.weight.shape[1]):
        raise ConfigError(f"the checkpoint's item table is {tuple(table.shape)}, expected "
                          f"({emb.n_items + 2}, {emb.weight.shape[1]}) for {emb.n_items} items")

    def cut(t: Tensor) -> Tuple[Tensor, Tensor]:  # (slice, mask row) of a (V + 2, d) tensor
        return t[1 + emb.start:1 + emb.stop], t[emb.n_items + 1:emb.n_items + 2]

    local = {k: v for k, v in model_state.items() if k != PREFIX + "weight"}
    local[PREFIX + "weight"], local[PREFIX + "mask"] = cut(table)
    model.load_state_dict(local)
    if optimizer is None or optimizer_state is None:
        return
    names, full_names = _names(model)
    state = optimizer_state["state"]
    if len(optimizer_state["param_groups"]) != 1 or len(
            optimizer_state["param_groups"][0]["params"]) != len(full_names):
        raise ConfigError("the checkpoint's optimizer state does not match this model's parameters")
    out_state = {}
    for i, name in enumerate(names):
        source = PREFIX + "weight" if name == PREFIX + "mask" else name
        entry = state.get(full_names.index(source))
        if entry is None:
            continue
        if source == PREFIX + "weight":  # fresh tensors: Adam steps "step" in place
            part = 1 if name == PREFIX + "mask" else 0
            entry = {k: (cut(v)[part] if v.shape == table.shape else v).clone()
                     if torch.is_tensor(v) else v for k, v in entry.items()}
        out_state[i] = entry
    group = dict(optimizer_state["param_groups"][0], params=list(range(len(names))))
    optimizer.load_state_dict({"state": out_state, "param_groups": [group]})


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_ranks(model: S4Rec, data, split: str, users: np.ndarray, batch_size: int,
                  exclude_history: str = "all", max_pad: float = 1 / 3,
                  precision: str = "fp32") -> np.ndarray:
    """metrics.compute_ranks over the sharded table for this rank's ``users``, at `precision` as
    there. Every rank calls it; each runs the same number of batches (the lookups and item_rank
    are collectives)."""
    emb = sharded(model)
    sizes = _row_sizes(len(users), emb.group, emb.weight.device)
    if min(sizes) == 0:
        raise ConfigError(f"evaluation needs at least one user per rank, got {sizes}")
    n_batches = min(math.ceil(max(sizes) / batch_size), min(sizes))
    was_training = model.training
    model.eval()
    device = emb.weight.device
    ranks = []
    try:
        with autocast(precision, device):
            for part in np.array_split(np.asarray(users), n_batches):
                packed = pack(split_input(data, part, split), model.encoder.max_len, max_pad,
                              device)
                z, _ = model.encoder.encode(packed)  # (b, d)
                targets = torch.as_tensor(split_target(data, part, split) - 1, device=device)
                if exclude_history == "all":
                    indptr, indices = history_csr(data, part, split)
                else:
                    indptr, indices = np.zeros(len(part) + 1, np.int64), np.zeros(0, np.int64)
                rank = item_rank(*op_inputs(z, emb.item_table()), targets,
                                 torch.as_tensor(indptr, device=device),
                                 torch.as_tensor(indices, device=device), shard=emb.shard)
                ranks.append(rank.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(ranks)
