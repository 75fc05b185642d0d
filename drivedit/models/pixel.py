"""The pixel codec's encoder in numpy: the identity on [-1, 1] images needs no torch, so a Ray Data
actor that only runs this starts without importing torch (seconds per actor on a small machine)."""
from __future__ import annotations

import numpy as np

PIXEL_LOGVAR = -20.0  # the pixel "posterior" is a point mass; exp(-10) keeps sampled noise below 1e-4


def pixel_moments(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> moments (N, 6, H, W) float32: mean = the image in [-1, 1], log-variance
    PIXEL_LOGVAR; the same float32 arithmetic as `PixelCodec.encode` on `x / 127.5 - 1`."""
    mean = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0)
    return np.concatenate([mean, np.full_like(mean, PIXEL_LOGVAR)], axis=1)
