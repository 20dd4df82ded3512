"""The options that test S4Rec's self-supervised terms: projection head, K-means prototypes,
length-aware views with substitute, gradient shares, and the cluster report."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s4rec.augment import Augmenter, neighbours, substitute
from s4rec.batches import make_augmenter, make_batch
from s4rec.config import Config, ConfigError, check_config
from s4rec.data import head_users, synthetic
from s4rec.losses import compute_losses, gradient_shares, total_loss
from s4rec.metrics import cluster_report, encode_users, prototypes_trained
from s4rec.model import S4Rec
from s4rec.prototypes import fit_kmeans

SMALL = dict(hidden=16, heads=2, layers=1, n_clusters=8, batch_size=64, max_len=20, dropout=0.0)


@pytest.fixture(scope="module")
def data():
    return synthetic(n_users=200, n_items=60, n_intents=4, seed=3)


def _setup(data, **kw):
    cfg = Config(**{**SMALL, **kw})
    check_config(cfg)
    torch.manual_seed(0)
    model = S4Rec.from_config(data.n_items, cfg)
    aug = make_augmenter(cfg, data, model.encoder.mask_id)
    rng = np.random.default_rng(0)
    users = np.arange(64)
    batch = make_batch(data, users, head_users(data), cfg, aug, rng, "cpu")
    return cfg, model, batch


@pytest.mark.parametrize("head", ["none", "linear", "mlp"])
def test_projection_head_feeds_the_ssl_terms_only(data, head):
    cfg, model, batch = _setup(data, proj_head=head)
    n_proj = sum(p.numel() for p in model.project.parameters())
    assert n_proj == {"none": 0, "linear": 16 * 17, "mlp": 2 * 16 * 17}[head]
    terms, _ = compute_losses(model, batch, cfg)
    total_loss(terms, cfg).backward()
    if head != "none":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.project.parameters())
    # the adversary sees z itself: its gradient on the projection head is zero
    model.zero_grad()
    terms, _ = compute_losses(model, batch, cfg)
    terms["adv"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.project.parameters())


def test_kmeans_prototypes_are_normalised_centroids_and_get_no_gradient(data):
    from s4rec.train import train_step
    cfg, model, batch = _setup(data, prototypes="kmeans", alpha=0.0)
    fit_kmeans(model, data, np.arange(len(data)), 128, seed=0)
    protos = model.prototypes.detach().clone()
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _, terms, assign = train_step(model, optimizer, batch, cfg, 0)
    assert "clust" not in terms and assign is not None
    torch.testing.assert_close(model.prototypes.detach(), protos)


def test_kmeans_refuses_the_clustering_weight():
    with pytest.raises(ConfigError, match="--alpha 0"):
        check_config(Config(prototypes="kmeans"))


def test_gradient_shares_sum_to_one_and_see_a_tiny_weight(data):
    cfg, model, batch = _setup(data)
    terms, _ = compute_losses(model, batch, cfg)
    params = list(model.encoder.parameters())
    shares = gradient_shares(terms, cfg, params)
    assert set(shares) == set(terms) and abs(sum(shares.values()) - 1) < 1e-9
    tiny = Config(**{**SMALL, "beta2": 1e-6})
    assert gradient_shares(terms, tiny, params)["ckd"] < 1e-4 * shares["ckd"] + 1e-12
    # the graph survives for the step's own backward
    total_loss(terms, cfg).backward()


def test_substitute_replaces_items_by_training_neighbours():
    graph = neighbours([np.array([1, 2, 3]), np.array([3, 4])], n_items=5)
    indptr, indices = graph
    assert sorted(indices[indptr[3]:indptr[4]].tolist()) == [2, 4]
    assert indptr[5] == indptr[6]  # item 5 has no neighbour
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = substitute(np.array([3, 5]), rng, 1.0, graph=graph)
        assert out[0] in (2, 4) and out[1] == 5
    seq = np.array([1, 2, 3, 4])
    out = substitute(seq, rng, 0.5, graph=graph)
    assert (out != seq).sum() <= 2 and len(out) == 4


def test_length_aware_views_pick_operators_by_length():
    rng = np.random.default_rng(0)
    graph = neighbours([np.arange(1, 30)], n_items=40)
    aug = Augmenter(mask_id=99, pool=np.arange(1, 30), operators=("mask",), mask_ratio=1.0,
                    short_len=3, short_ops=("insert",), graph=graph)
    short, long = np.array([1, 2, 3]), np.arange(1, 10)
    for view_short, view_long in (aug.views([short, long], rng) for _ in range(20)):
        assert len(view_short) == 4 and set(short) <= set(view_short)  # insert only
        assert (view_long == 99).all()  # mask only


def test_length_flags_build_the_augmenter(data):
    cfg = Config(**SMALL, augment="length", short_len=5, short_ops="substitute",
                 long_ops="crop,reorder")
    aug = make_augmenter(cfg, data, 61)
    assert aug.short_len == 5 and aug.short_ops == ("substitute",)
    assert aug.operators == ("crop", "reorder") and aug.graph is not None
    with pytest.raises(ConfigError, match="--short-ops"):
        check_config(Config(short_ops="crop,shuffle"))


def test_cluster_report_uses_the_best_prototype_and_skips_untrained(data):
    cfg, model, _ = _setup(data)
    head = head_users(data)
    report = cluster_report(model, data, head, 128)
    model.eval()
    with torch.no_grad():
        z = torch.cat([z for _, z in encode_users(model, data, np.arange(len(data)), "valid", 50)])
        best = (F.normalize(model.project(z), dim=1) @ F.normalize(model.prototypes, dim=1).T).argmax(1)
    assert report["size"] == np.bincount(best.numpy(), minlength=8).tolist()
    rate = [float(head[best.numpy() == k].mean()) if (best == k).any() else None for k in range(8)]
    assert report["head_rate"] == pytest.approx(rate)
    assert "argmax" in report["assignment"]
    assert not prototypes_trained(Config(alpha=0, beta1=0, beta2=0.1))
    assert prototypes_trained(Config(alpha=0, beta1=0, prototypes="kmeans"))
    none = cluster_report(model, data, head, 128, trained=False)
    assert none["size"] == [] and none["head_rate_quartiles"] is None
