"""Latents -> uint8 images -> PNG bytes: the one place generation and serving turn samples into files."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from drivedit.generate.grid import latents_to_uint8

DECODE_CHUNK = 16  # images per codec.decode call: bounds a VAE decoder's activation memory


def decode_to_uint8(codec, latents: torch.Tensor) -> np.ndarray:
    """(N, C, h, w) latents -> (N, H, W, 3) uint8, decoding in chunks of DECODE_CHUNK."""
    images = torch.cat([codec.decode(chunk) for chunk in latents.split(DECODE_CHUNK)])  # (N, 3, H, W) in [-1, 1]
    return np.ascontiguousarray(latents_to_uint8(images.cpu()))


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes with fixed settings: the same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
