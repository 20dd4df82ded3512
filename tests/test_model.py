import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s4rec.config import Config
from s4rec.losses import Batch, compute_losses, sr_loss, total_loss
from s4rec.model import S4Rec, pack


def _model(n_items=50, **kw):
    torch.manual_seed(0)
    return S4Rec(n_items, hidden=16, heads=2, layers=2, dropout=0.0, max_len=12, n_clusters=6, **kw)


def _seqs(rng, n, n_items=50, lo=0, hi=20):
    return [rng.integers(1, n_items + 1, size=int(rng.integers(lo, hi))) for _ in range(n)]


def test_buckets_encode_like_full_padding():
    # Length buckets are an optimisation only: z and every real position's H must not change.
    rng = np.random.default_rng(0)
    model = _model().eval()
    seqs = _seqs(rng, 23, lo=1)
    bucketed = pack(seqs, 12, 0.1, "cpu")
    padded = pack(seqs, 12, 1.0, "cpu")
    assert len(bucketed.groups) > 1 and len(padded.groups) == 1
    assert bucketed.n_encoded < padded.n_encoded
    assert bucketed.padding_share <= 0.1 + 1e-9
    with torch.no_grad():
        z_b, _ = model.encoder.encode(bucketed)
        z_p, _ = model.encoder.encode(padded)
        full = torch.as_tensor(np.stack([np.pad(s[-12:], (12 - len(s[-12:]), 0)) for s in seqs]))
        z_full = model.encoder(full)[:, -1]
    torch.testing.assert_close(z_b, z_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_b, z_full, atol=1e-5, rtol=1e-5)


def test_empty_and_padding_rows_stay_finite():
    model = _model().eval()
    seqs = [np.array([], dtype=np.int64), np.array([3]), np.array([1, 2, 3, 4])]
    with torch.no_grad():
        h = model.encoder(torch.as_tensor([[0, 0, 0, 0], [0, 0, 0, 3], [1, 2, 3, 4]]))
        z, _ = model.encoder.encode(pack(seqs, 12, 1 / 3, "cpu"))
    assert torch.isfinite(h).all() and torch.isfinite(z).all()


def test_sr_loss_skips_padding_exactly():
    # The loss over non-padded positions equals cross-entropy over the padded grid with padding ignored.
    rng = np.random.default_rng(1)
    model = _model()
    seqs = _seqs(rng, 9, lo=2)
    inputs, targets = [s[:-1] for s in seqs], [s[1:] for s in seqs]
    packed = pack(inputs, 12, 1 / 3, "cpu", targets)
    z, hidden = model.encoder.encode(packed)
    loss = sr_loss(model.encoder.item_table(), hidden, packed.targets)
    logits, labels = [], []
    for h, t in zip(hidden, packed.targets):
        logits.append((h @ model.encoder.item_table().T).reshape(-1, 50))
        labels.append((t - 1).reshape(-1))
    expected = F.cross_entropy(torch.cat(logits), torch.cat(labels), ignore_index=-1)
    torch.testing.assert_close(loss, expected)


def _batch(cfg, rng, model, n=16):
    seqs = _seqs(rng, n, lo=3)
    inputs, targets = [s[:-1] for s in seqs], [s[1:] for s in seqs]
    views = [pack([s[: max(1, len(s) // 2)] for s in inputs], 12, cfg.max_pad, "cpu"),
             pack([s[len(s) // 2:] for s in inputs], 12, cfg.max_pad, "cpu")]
    head = torch.as_tensor(rng.integers(0, 2, n))
    return Batch(pack(inputs, 12, cfg.max_pad, "cpu", targets), views[0], views[1], head)


def test_every_term_is_finite_and_reaches_its_parameters():
    cfg = Config(n_clusters=6)
    model = _model()
    terms, assign = compute_losses(model, _batch(cfg, np.random.default_rng(2), model), cfg)
    assert set(terms) == {"sr", "clust", "scl", "ckd", "adv"}
    assert assign.shape == (16,) and int(assign.max()) < 6
    for name, value in terms.items():
        assert torch.isfinite(value), name
    total_loss(terms, cfg).backward()
    for p in (model.prototypes, model.adversary.weight, model.encoder.item_emb.weight,
              model.encoder.pos_emb.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("zeroed, missing", [
    ("alpha", {"clust"}), ("beta1", {"scl"}), ("beta2", {"ckd"}), ("lam", {"adv"}),
])
def test_zero_weight_removes_the_term(zeroed, missing):
    cfg = Config(n_clusters=6, **{zeroed: 0.0})
    model = _model()
    terms, _ = compute_losses(model, _batch(cfg, np.random.default_rng(3), model), cfg)
    assert set(terms) == {"sr", "clust", "scl", "ckd", "adv"} - missing


def test_sr_only_needs_no_views_or_clusters():
    cfg = Config(n_clusters=6, alpha=0, beta1=0, beta2=0, lam=0)
    model = _model()
    batch = _batch(cfg, np.random.default_rng(4), model)
    batch.view1 = batch.view2 = None
    terms, assign = compute_losses(model, batch, cfg)
    assert set(terms) == {"sr"} and assign is None


def test_gradient_reversal_flips_the_encoder_gradient_only():
    model = _model()
    z = torch.randn(5, 16, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0, 1])
    F.cross_entropy(model.head_logits(z), labels).backward()
    grad_reversed = z.grad.clone()
    w_grad = model.adversary.weight.grad.clone()
    z.grad = None
    model.adversary.weight.grad = None
    F.cross_entropy(model.adversary(z), labels).backward()
    torch.testing.assert_close(grad_reversed, -z.grad)
    torch.testing.assert_close(w_grad, model.adversary.weight.grad)


def test_prototypes_renormalised():
    model = _model()
    with torch.no_grad():
        model.prototypes.mul_(3.0)
    model.renormalize_prototypes()
    torch.testing.assert_close(model.prototypes.norm(dim=1), torch.ones(6))
