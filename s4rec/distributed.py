"""Data-parallel training under torchrun: `torchrun --nproc_per_node W -m s4rec.train [flags]`.

Every rank holds the whole model. --batch-size is the global batch: each batch's users are split
into W contiguous parts, one per rank. The batch order comes from (seed, epoch) and each user's
training window and augmentations from (seed, epoch, user), never from the rank, so the data a run
sees does not depend on W (a 1-rank torchrun run sees the same batches as a 4-rank one; a plain
`python -m s4rec.train` run keeps its own single generator). Each rank's loss terms follow the ops'
contract (the sum over the ranks is the single-process value on the whole batch: Sinkhorn and the
contrast run across the group, the means are this rank's sum over the global count), so summing
the gradients over the ranks (one all-reduce of all gradients per step) gives the single-process
gradient. Evaluation splits the users across the ranks and gathers their integer ranks, so the
metrics equal a single process's. With --shard-items each rank holds only its rows of the item
table, L_SR and the evaluation's ranking are vocabulary parallel, and the slice's gradient is not
all-reduced (s4rec.sharded_items). Rank 0 alone prints and writes; checkpoints hold the whole
model in the single-process layout, so --resume works with another W, sharded or not. An error
on one rank is printed by that rank as one line and the process exits, which makes torchrun end
the other ranks; a collective waits at most --dist-timeout seconds.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from s4rec_kernels._dispatch import deferred_errors

from . import checkpoint, precision, sharded_items
from .batches import make_augmenter, window
from .config import Config, ConfigError, to_dict
from .data import head_users, save_mapping, train_sequences
from .losses import Batch, compute_losses, needs_views, total_loss, weights
from .metrics import compute_ranks, format_table, protocol, rank_metrics, sr_loss_name
from .model import S4Rec, pack
from .runlog import default_run_dir, epoch_line, write_log
from .runtime import cluster_health, load_data, resolve_device

USER_TERMS = ("clust", "ckd", "adv")  # means over the batch's users


def launched() -> bool:
    """True when started by torchrun (which sets the rank variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ)


def setup(cfg: Config) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = cfg.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("--dist-backend nccl needs CUDA devices; use gloo on CPU")
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist_timeout))
    return device


def say(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def epoch_batches(trainable: np.ndarray, batch_size: int, seed: int, epoch: int) -> List[np.ndarray]:
    """The epoch's global batches, in an order drawn from (seed, epoch) alone."""
    order = np.random.default_rng([seed, epoch]).permutation(trainable)
    return np.array_split(order, max(1, math.ceil(len(trainable) / batch_size)))


def make_user_batch(data, users: np.ndarray, head: np.ndarray, cfg: Config, augmenter,
                    epoch: int, device) -> Batch:
    """Like batches.make_batch, with each user's window and views drawn from (seed, epoch, user)."""
    rngs = [np.random.default_rng([cfg.seed, epoch, int(u)]) for u in users]
    cut = [window(s, cfg.max_len + 1, cfg.train_window, r)
           for s, r in zip(train_sequences(data, users), rngs)]
    inputs, targets = [s[:-1] for s in cut], [s[1:] for s in cut]
    original = pack(inputs, cfg.max_len, cfg.max_pad, device, targets)
    view1 = view2 = None
    if needs_views(cfg):
        view1 = pack([augmenter.views([x], r)[0] for x, r in zip(inputs, rngs)], cfg.max_len,
                     cfg.max_pad, device)
        view2 = pack([augmenter.views([x], r)[0] for x, r in zip(inputs, rngs)], cfg.max_len,
                     cfg.max_pad, device)
    labels = torch.as_tensor(head[users].astype(np.int64), device=device)
    return Batch(original, view1, view2, labels)


def summed_over_ranks(values, device) -> torch.Tensor:
    """``values`` (numbers, or a tensor on ``device``) summed over the ranks, as a float64 tensor
    on ``device``; no wait for the device (on NCCL the all-reduce is queued on its stream)."""
    if torch.is_tensor(values):
        t = values.to(torch.float64)
    else:
        t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t


def all_reduce_grads(params: List[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the ranks in one flat buffer (a missing gradient is
    zero, so every rank sends the same layout)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


def train_step(model: S4Rec, optimizer, batch: Batch, cfg: Config, step: int,
               rank_users: List[int], global_positions: torch.Tensor, device):
    """One step on this rank's part of the batch: (the global terms and their weighted total, a
    float64 vector on the device in the order of ``terms``'s keys, then the total; the assigned
    clusters). ``rank_users``: every rank's user count, in rank order. It waits for the device
    once, to check that every global term is finite (all ranks see the same values, so they raise
    together)."""
    table = sharded_items.sharded(model)
    shard = table.shard if table is not None else None
    with precision.autocast(precision.resolve(cfg.precision, device)[0], device):
        terms, assign = compute_losses(model, batch, cfg, group=dist.group.WORLD, shard=shard,
                                       group_rows=rank_users)
    # the terms computed across the group are this rank's share of the global value already;
    # the SR loss is a mean over this rank's positions (every input position has a target)
    scale = {"sr": 1.0 if shard else batch.original.n_real / global_positions, "scl": 1.0}
    users, global_users = rank_users[dist.get_rank()], sum(rank_users)
    terms = {k: v * scale.get(k, users / global_users) for k, v in terms.items()}
    loss = total_loss(terms, cfg)
    names = list(terms)
    summed = summed_over_ranks(torch.stack([terms[k].detach().to(torch.float64) for k in names]),
                               device)
    w = weights(cfg)
    total = sum(w[k] * summed[i] for i, k in enumerate(names))
    if not bool(torch.isfinite(summed).all()):  # the step's one wait for the device
        bad = [k for k, v in zip(names, summed.tolist()) if not math.isfinite(v)]
        causes = "".join(f"; {e}" for e in deferred_errors())  # inputs the kernels got wrong
        raise FloatingPointError(f"loss term {', '.join(bad)} became non-finite at step "
                                 f"{step}{causes}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if table is not None:
        table.flush_grads()  # the lookups' gradients, to the ranks owning the rows
    all_reduce_grads(sharded_items.replicated_parameters(model))
    if step < cfg.freeze_protos_steps:
        model.prototypes.grad = None
    optimizer.step()
    if cfg.proto_renorm:
        model.renormalize_prototypes()
    return torch.cat([summed, total.reshape(1)]), names, assign


def global_step(model, optimizer, data, users: np.ndarray, head, cfg: Config, augmenter, epoch: int,
                step: int, device):
    """One step on a global batch of ``users``, this rank's contiguous part of it: (the global terms
    and total as in ``train_step``, their names, the assigned clusters, this rank's batch)."""
    parts = np.array_split(users, dist.get_world_size())
    batch = make_user_batch(data, parts[dist.get_rank()], head, cfg, augmenter, epoch, device)
    global_pos = summed_over_ranks([batch.original.n_real], device)[0]
    values, names, assign = train_step(model, optimizer, batch, cfg, step, [len(p) for p in parts],
                                       global_pos, device)
    return values, names, assign, batch


def train_epoch(model, optimizer, data, trainable, head, cfg, augmenter, device, step, epoch):
    """One pass over the epoch's global batches, this rank's part of each; returns (epoch stats,
    step). As in the single-process trainer, the terms and cluster sizes are summed on the device
    and read once, at the end: a step waits for the device only in its non-finite check."""
    model.train()
    batches = epoch_batches(trainable, cfg.batch_size, cfg.seed, epoch)
    sums = counts = None
    real = encoded = 0
    for users in batches:
        values, names, assign, batch = global_step(model, optimizer, data, users, head, cfg,
                                                   augmenter, epoch, step, device)
        step += 1
        sums = values if sums is None else sums + values
        if assign is not None:
            sizes = torch.bincount(assign, minlength=cfg.n_clusters)
            counts = sizes if counts is None else counts + sizes
        real += batch.original.n_real
        encoded += batch.original.n_encoded
    stats = {f"loss_{k}": v / len(batches) for k, v in zip([*names, "total"], sums.tolist())}
    if counts is None:
        counts = torch.zeros(cfg.n_clusters, dtype=torch.int64, device=device)
    totals = summed_over_ranks(torch.cat([counts.to(torch.float64),
                                          torch.tensor([real, encoded], dtype=torch.float64,
                                                       device=device)]), device).tolist()
    counts = np.asarray(totals[:-2]).round().astype(np.int64)
    if counts.sum():
        stats.update(cluster_health(counts))
    stats["padding_share"] = 1.0 - totals[-2] / max(totals[-1], 1)
    return stats, step


@torch.no_grad()
def evaluate(model, data, split: str, head: np.ndarray, cfg: Config) -> Dict[str, Dict[str, float]]:
    """metrics.evaluate with the users split across the ranks; equal to a single process's."""
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = np.array_split(np.arange(len(data)), world)
    prec = precision.resolve(cfg.precision, model.prototypes.device)[0]
    if sharded_items.sharded(model) is not None:
        ranks = sharded_items.compute_ranks(model, data, split, parts[rank], cfg.eval_batch_size,
                                            cfg.exclude_history, cfg.max_pad, prec)
    else:
        ranks = compute_ranks(model, data, split, cfg.eval_batch_size, cfg.exclude_history,
                              cfg.max_pad, users=parts[rank], precision=prec)
    gathered: List[Optional[np.ndarray]] = [None] * world
    dist.all_gather_object(gathered, ranks)
    ranks = np.concatenate(gathered)
    return {"overall": rank_metrics(ranks), "head": rank_metrics(ranks[head]),
            "tail": rank_metrics(ranks[~head])}


def check_supported(cfg: Config, world: int) -> None:
    if cfg.sr_loss != "ce":
        raise ConfigError("torchrun runs support --sr-loss ce only (the vocabulary-parallel "
                          "full softmax); got " + cfg.sr_loss)
    if cfg.prototypes != "online":
        raise ConfigError("torchrun runs support --prototypes online only")
    if cfg.seeds:
        raise ConfigError("torchrun runs take one --seed, not --seeds")
    if cfg.batch_size < world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {world} ranks")


def run(cfg: Config) -> Dict:
    """Train one seed data parallel across the torchrun ranks, then evaluate on valid and test."""
    device = setup(cfg)
    prec, note = precision.resolve(cfg.precision, device)
    if note:
        say(note)
    with precision.settings(prec, device):
        return _train(cfg, device, prec)


def _train(cfg: Config, device: torch.device, prec: str) -> Dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    check_supported(cfg, world)
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    quiet = contextlib.redirect_stdout(open(os.devnull, "w")) if rank else contextlib.nullcontext()
    with quiet:
        data = load_data(cfg)
    head = head_users(data, cfg.head_frac)
    trainable = np.flatnonzero(data.lengths >= 4)
    smallest = len(trainable) // max(1, math.ceil(len(trainable) / cfg.batch_size))
    if smallest < world:
        raise ConfigError(f"batches of {smallest} users cannot give each of the {world} ranks one")
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(data)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    names = [str(run_dir)]
    dist.broadcast_object_list(names, src=0)  # the default name holds the time: rank 0's wins
    run_dir = Path(names[0])
    cfg.run_dir = str(run_dir)
    model = S4Rec.from_config(data.n_items, cfg)  # the same initial model on every rank
    if cfg.shard_items:
        if data.n_items < world:
            raise ConfigError(f"--shard-items needs at least one item per rank: {data.n_items} "
                              f"items, {world} ranks")
        sharded_items.shard_model(model, world, rank)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augmenter = make_augmenter(cfg, data, model.encoder.mask_id)
    state = checkpoint.new_state()
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    if cfg.resume:
        state = restore(last_path, model, optimizer, device, cfg.patience)
        say(f"resumed {run_dir} at epoch {state['epoch']} on {world} ranks")
    for p in sharded_items.replicated_parameters(model):  # rank 0's, whatever happened elsewhere
        dist.broadcast(p.data, src=0)
    table = sharded_items.sharded(model)
    split = (f"; item table split by rows, rank 0 holds [{table.start}, {table.stop}) of "
             f"{data.n_items}" if table is not None else "")
    say(f"data parallel over {world} rank(s) ({dist.get_backend()}), global batch "
        f"{cfg.batch_size}{split}")
    if rank == 0:
        checkpoint.save_json(to_dict(cfg), run_dir / "config.json")
        save_mapping(data, run_dir)

    def save_last():
        model_state, optimizer_state = full_states(model, optimizer)  # every rank takes part
        if rank == 0:
            checkpoint.save({"model": model_state, "optimizer": optimizer_state,
                             "scheduler": None, "state": state, "rng": None,
                             "config": to_dict(cfg)}, last_path)

    while state["epoch"] < cfg.resolved_epochs() and not state["stopped"]:
        save_last()
        epoch = state["epoch"]
        t0 = time.time()
        stats, state["step"] = train_epoch(model, optimizer, data, trainable, head, cfg,
                                           augmenter, device, state["step"], epoch)
        stats = {"epoch": epoch, **stats, "train_seconds": time.time() - t0,
                 "lr": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % cfg.eval_every == 0:
            t0 = time.time()
            stats["valid"] = evaluate(model, data, "valid", head, cfg)["overall"]
            stats["eval_seconds"] = time.time() - t0
            if stats["valid"]["ndcg@20"] > state["best_score"]:
                state.update(best_score=stats["valid"]["ndcg@20"], best_epoch=epoch, bad_evals=0)
                model_state, _ = full_states(model, None)
                if rank == 0:
                    checkpoint.save({"model": model_state, "config": to_dict(cfg),
                                     "epoch": epoch, "valid": stats["valid"]}, best_path)
            else:
                state["bad_evals"] += 1
        say(epoch_line(stats, cfg.n_clusters) + (" *" if state["best_epoch"] == epoch else ""))
        state["history"].append(stats)
        state["epoch"] = epoch + 1
        if rank == 0:
            write_log(run_dir, state["history"])
        if state["bad_evals"] >= cfg.patience:
            say(f"early stop: no better valid ndcg@20 for {cfg.patience} evaluations")
            state["stopped"] = True
    save_last()
    dist.barrier()
    if best_path.exists():
        load_model(model, torch.load(best_path, map_location="cpu")["model"])
    valid, test = evaluate(model, data, "valid", head, cfg), evaluate(model, data, "test", head, cfg)
    say(format_table(valid, f"valid (best epoch {state['best_epoch']})"))
    say(format_table(test, "test"))
    results = {"dataset": data.name, "seed": cfg.seed, "users": len(data), "items": data.n_items,
               "best_epoch": state["best_epoch"], "epochs_run": len(state["history"]),
               "train_seconds": round(sum(h["train_seconds"] + h.get("eval_seconds", 0.0)
                                          for h in state["history"]), 1),
               "world_size": world, "device": str(device),
               "protocol": protocol(cfg.exclude_history, sr_loss_name(cfg),
                                    precision.describe(prec, cfg.precision)),
               "valid": valid, "test": test, "config": to_dict(cfg)}
    if rank == 0:
        checkpoint.save_json(results, run_dir / "metrics.json")
        say(f"wrote {run_dir / 'metrics.json'}")
    return results


def full_states(model, optimizer):
    """(model, optimizer) state dicts in the single-process layout; with a sharded item table,
    gathered to rank 0 (None elsewhere; every rank must call). optimizer None: None."""
    if sharded_items.sharded(model) is None:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    model_state = sharded_items.full_model_state(model)
    if optimizer is None:
        return model_state, None
    return model_state, sharded_items.full_optimizer_state(model, optimizer)


def load_model(model, state) -> None:
    """Load a single-process state dict, slicing the item table when it is sharded."""
    if sharded_items.sharded(model) is None:
        model.load_state_dict(state)
    else:
        sharded_items.load_full_state(model, None, state)


def restore(path: Path, model, optimizer, device, patience: int) -> Dict:
    """checkpoint.restore, slicing the item table and its Adam state when it is sharded;
    returns the loop state."""
    if sharded_items.sharded(model) is None:
        return checkpoint.restore(path, model, optimizer, device, patience)["state"]
    ckpt = checkpoint.load(path, "cpu")  # the whole table on the host, sliced before the device
    sharded_items.load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
    ckpt["state"]["stopped"] = ckpt["state"]["bad_evals"] >= patience
    return ckpt["state"]


def _interrupt(signum, frame):
    raise checkpoint.Interrupted(signum)


def main(cfg: Config) -> int:
    """Run under torchrun; any error, SIGTERM and SIGINT included, is one line on the rank that
    met it, and a non-zero exit (torchrun then ends the other ranks)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(cfg)
    except Exception as err:  # noqa: BLE001 (every error ends this rank with one line)
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        print(f"error on rank {rank}: {type(err).__name__}: {err}".splitlines()[0],
              file=sys.stderr, flush=True)
        os._exit(3 if isinstance(err, FloatingPointError) else 2)  # no collective waits on exit
    if dist.is_initialized():
        # every rank leaves together: a rank that tore down its gloo connections while another
        # still wrote its results was seen to abort in gloo's background thread
        dist.barrier()
        dist.destroy_process_group()
    return 0
