"""k-means codebooks in torch: k-means++ initialisation, then mini-batch updates.

Runs on whatever device the data is on (CPU or GPU); no scikit-learn. The mini-batch
update is Sculley's (2010): each centre moves towards the mean of the points assigned to
it in the batch with a step of n_batch / n_total, its own running count.
"""

from __future__ import annotations

import torch

from fmb.errors import DataError


def nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest centre for each row of x (chunked to bound memory)."""
    out = torch.empty(len(x), dtype=torch.long, device=x.device)
    c_sq = (centres * centres).sum(1)
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin.
        out[start:start + chunk] = (c_sq[None, :] - 2.0 * part @ centres.T).argmin(1)
    return out


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k centres drawn from the rows of x with probability proportional to D^2 (Arthur & Vassilvitskii)."""
    n = len(x)
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centres = [x[first[0]]]
    dist = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        # All remaining points coincide with a centre: any point will do (no host sync).
        weights = torch.where(dist.sum() > 0, dist, torch.ones_like(dist))
        pick = torch.multinomial(weights, 1, generator=generator)[0]
        centres.append(x[pick])
        dist = torch.minimum(dist, ((x - x[pick]) ** 2).sum(1))
    return torch.stack(centres)


def fit_kmeans(x: torch.Tensor, k: int, steps: int = 100, batch_size: int = 4096, seed: int = 0,
               init_samples: int | None = None, name: str = "k-means") -> torch.Tensor:
    """Codebook (k, D) for the rows of x (N, D), float32, on x's device.

    `init_samples` bounds the points seen by k-means++ (default 16 k); `name` is used in errors.
    """
    x = x.float()
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"{name}: no feature vectors to fit a codebook on")
    if not torch.isfinite(x).all():
        raise DataError(f"{name}: feature vectors contain NaN or inf")
    if len(x) < k:
        raise DataError(f"{name}: {len(x)} feature vectors are fewer than the codebook size {k}; "
                        "lower the codebook size or give more data")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    limit = init_samples or 16 * k
    sample = x[torch.randperm(len(x), generator=gen, device=x.device)[:limit]] if len(x) > limit else x
    centres = kmeans_plus_plus(sample, k, gen)
    counts = torch.zeros(k, device=x.device)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (min(batch_size, len(x)),), generator=gen, device=x.device)]
        labels = nearest(batch, centres)
        n_batch = torch.bincount(labels, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, labels, batch)
        counts += n_batch
        rate = (n_batch / counts.clamp_min(1.0))[:, None]
        mean = sums / n_batch.clamp_min(1.0)[:, None]
        centres = centres + rate * (mean - centres)  # rate is 0 for centres with no points
    return centres
