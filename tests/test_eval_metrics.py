"""FID, KID and k-NN precision / recall against independent references and constructed answers."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from drivedit.eval import metrics
from drivedit.eval.evaluate import distribution_metrics


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root (as pytorch-fid computes it)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 written out with explicit pair loops over the cubic polynomial kernel."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_fid_matches_scipy_reference_and_is_zero_on_itself():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(300, 8)) * 1.5 + 0.3
    assert metrics.fid(a, b) == pytest.approx(_reference_fid(a, b), rel=1e-6)
    assert abs(metrics.fid(a, a)) < 1e-6
    # fewer samples than dimensions: rank-deficient covariances must still give ~0 against itself
    few = rng.normal(size=(20, 64))
    assert abs(metrics.fid(few, few)) < 1e-6


def test_fid_of_a_mean_shift_is_its_squared_norm_and_monotone():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6))
    direction = rng.normal(size=6)
    # same samples, same covariance: the Fréchet distance is exactly the squared shift
    assert metrics.fid(x, x + direction) == pytest.approx(float(direction @ direction), rel=1e-8)
    y = rng.normal(size=(500, 6))  # an independent draw of the same distribution
    scores = [metrics.fid(x, y + s * direction) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


def test_kid_matches_explicit_pair_loops_and_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 0.5
    assert metrics.mmd2_unbiased(x, y[:25]) == pytest.approx(_reference_mmd2(x, y[:25]), rel=1e-9)
    # subsets as large as the sets: every subset is the whole set, so KID equals the plain estimate
    mean, std = metrics.kid(x, y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(_reference_mmd2(x, y), rel=1e-9) and std < 1e-12

    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same_mean, same_std = metrics.kid(a, b, num_subsets=20, subset_size=200)
    shifted_mean, _ = metrics.kid(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 20 * max(abs(same_mean), same_std)
    assert abs(metrics.kid(a, a, num_subsets=10, subset_size=200)[0]) < 0.05 * shifted_mean


def _grid(nx: int, ny: int, origin=(0.0, 0.0)) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float))
    return np.stack([xs.ravel() + origin[0], ys.ravel() + origin[1]], 1)


def test_knn_radii_on_a_line():
    line = np.arange(10, dtype=float)[:, None]
    # 3rd nearest other point: the end points reach 3 steps, the next ones 2, interior points 2 as well
    expected = [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    np.testing.assert_allclose(metrics.knn_radii(line, 3), expected, atol=1e-9)


def test_precision_recall_on_constructed_point_sets():
    cluster_a = _grid(5, 10)                       # 50 points, unit spacing
    cluster_b = _grid(5, 10, origin=(100.0, 0.0))  # far to the right
    cluster_c = _grid(5, 10, origin=(0.0, -100.0))  # far below
    real = np.concatenate([cluster_a, cluster_b])
    # fake covers cluster A exactly and invents cluster C: half of it is real-looking (precision 0.5)
    # and it covers only cluster A of the real data (recall 0.5)
    fake = np.concatenate([cluster_a, cluster_c])
    assert metrics.precision_recall(real, fake, k=3) == pytest.approx((0.5, 0.5))
    assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)
    # 10 of cluster C's points moved next to cluster A (0.1 off a grid point): precision 0.6
    near_a = cluster_a[:10] + 0.1
    fake2 = np.concatenate([cluster_a, near_a, cluster_c[:40]])
    precision, recall = metrics.precision_recall(real, fake2, k=3)
    assert precision == pytest.approx(0.6) and recall == pytest.approx(0.5)
    # a fake set collapsed onto one real point: perfectly precise, recalls almost nothing
    collapsed = np.repeat(cluster_a[:1], 20, axis=0) + np.random.default_rng(0).normal(0, 1e-3, (20, 2))
    p, r = metrics.precision_recall(real, collapsed, k=3)
    assert p == 1.0 and r == pytest.approx(1 / 100)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="differ in dimension"):
        metrics.fid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.fid(np.full((5, 3), np.nan), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 4 rows for a k-NN manifold with k=3"):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    small = distribution_metrics(np.zeros((3, 2)), np.ones((1, 2)))
    assert small["fid"] is None and small["precision"] is None and len(small["notes"]) == 2
