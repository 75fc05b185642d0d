"""Distribution metrics on feature vectors: FID, KID, and k-NN precision / recall.

All functions take two float arrays of features, `real` (N, D) and `fake` (M, D), from the same
extractor. They are plain numpy / scipy so that the numbers do not depend on which extractor or
device produced the features.
"""
from __future__ import annotations

import numpy as np


def _check_features(name: str, x: np.ndarray, min_rows: int, what: str = "this metric") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} features must be a 2-D array (num_images, dim), got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} features need at least {min_rows} rows for {what}, got {x.shape[0]}; "
                         "evaluate more images")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or inf; check the images and the feature extractor")
    return x


def _check_pair(real: np.ndarray, fake: np.ndarray, min_rows: int,
                what: str = "this metric") -> tuple[np.ndarray, np.ndarray]:
    real = _check_features("real", real, min_rows, what)
    fake = _check_features("fake", fake, min_rows, what)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension ({real.shape[1]} vs {fake.shape[1]}); "
                         "extract both with the same extractor")
    return real, fake


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (small negative eigenvalues from
    round-off are clipped to zero, which `scipy.linalg.sqrtm` would turn into complex parts)."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

    tr((cov1 cov2)^(1/2)) equals the sum of square roots of the eigenvalues of the symmetric PSD
    matrix s1 cov2 s1 with s1 = cov1^(1/2) (the two products are similar matrices); working with
    symmetric matrices keeps rank-deficient covariances (fewer images than feature dimensions) stable.
    """
    s1 = _psd_sqrt(cov1)
    middle = s1 @ cov2 @ s1
    middle = (middle + middle.T) / 2  # symmetric up to round-off; make it exactly so for eigvalsh
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt, 0.0))


def feature_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D)."""
    x = _check_features("input", x, 2)
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the two feature sets."""
    real, fake = _check_pair(real, fake, 2)
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The KID kernel of Bińkowski et al. 2018: k(x, y) = (x·y / d + 1)^3."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of the squared MMD between samples x (m, D) and y (n, D) under the
    polynomial kernel; within-set sums exclude the diagonal, so it can be slightly negative."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    sum_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    sum_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2.0 * kxy.mean())


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD^2 over random
    subsets (drawn without replacement within a subset); the subset size is capped by the smaller set."""
    real, fake = _check_pair(real, fake, 2)
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"kid needs num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(real[rng.choice(real.shape[0], size, replace=False)],
                      fake[rng.choice(fake.shape[0], size, replace=False)])
        for _ in range(num_subsets)
    ])
    return float(values.mean()), float(values.std())


def _pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(x), len(y)), from the expanded square to stay matrix-multiply fast."""
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.clip(d2, 0.0, None))


_ROW_BLOCK = 1024  # rows of a distance matrix held at once: 1024 x 50k float64 is 400 MB


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point of the same set (N,)."""
    if x.shape[0] <= k:
        raise ValueError(f"k-NN manifold with k={k} needs more than {k} points, got {x.shape[0]}; "
                         "evaluate more images or lower k")
    radii = np.empty(x.shape[0])
    for start in range(0, x.shape[0], _ROW_BLOCK):
        d = _pairwise_distances(x[start:start + _ROW_BLOCK], x)  # (B, N)
        # column 0 of a sorted row is the point itself (distance 0), so the k-th neighbour is column k
        radii[start:start + _ROW_BLOCK] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Fraction of queries that fall inside at least one hypersphere (manifold point, its radius)."""
    inside = np.zeros(queries.shape[0], dtype=bool)
    for start in range(0, queries.shape[0], _ROW_BLOCK):
        d = _pairwise_distances(queries[start:start + _ROW_BLOCK], manifold)  # (B, N)
        inside[start:start + _ROW_BLOCK] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the fraction of fake
    samples inside the real manifold (union of k-NN balls around real features), recall the
    fraction of real samples inside the fake manifold."""
    real, fake = _check_pair(real, fake, k + 1, f"a k-NN manifold with k={k}")
    precision = _coverage(real, knn_radii(real, k), fake)
    recall = _coverage(fake, knn_radii(fake, k), real)
    return precision, recall
