"""K-means prototypes (--prototypes kmeans): ICLRec's offline intents in place of online clustering.

At the start of every epoch the projected, L2-normalised representations of every user's training
sequence are clustered with scikit-learn's KMeans, and the centroids become the prototypes that
the contrast and the distillation use; they get no gradient.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import SequenceData
from .metrics import encode_users
from .model import S4Rec


@torch.no_grad()
def fit_kmeans(model: S4Rec, data: SequenceData, users: np.ndarray, batch_size: int, seed: int,
               threads: int = 0, max_pad: float = 1 / 3) -> float:
    """Set model.prototypes to the K-means centroids of the users' projected vectors; returns the
    K-means inertia (sum of squared distances to the nearest centroid)."""
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise ImportError("--prototypes kmeans needs scikit-learn: pip install scikit-learn") from None
    was_training = model.training
    model.eval()
    try:
        z = torch.cat([F.normalize(model.project(z), dim=1)
                       for _, z in encode_users(model, data, users, "valid", batch_size, max_pad)])
    finally:
        model.train(was_training)
    k = model.prototypes.shape[0]
    if len(z) < k:
        raise ValueError(f"--prototypes kmeans: {len(z)} users cannot make K={k} clusters")
    with threadpool_limits(threads or None):
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(z.double().cpu().numpy())
    centres = torch.as_tensor(km.cluster_centers_, dtype=model.prototypes.dtype,
                              device=model.prototypes.device)
    model.prototypes.copy_(F.normalize(centres, dim=1))
    return float(km.inertia_)
