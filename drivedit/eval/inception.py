"""The Inception-v3 of FID (pool3, 2048-d features), loading weights in the pytorch-fid format.

The network behind published FID numbers is TensorFlow's 2015-12-05 Inception graph, not
torchvision's ImageNet model. Its PyTorch port (`pt_inception-2015-12-05-*.pth`, a plain state dict
with torchvision's key names and a 1008-way `fc`) only reproduces it if four kinds of blocks are
changed, because TensorFlow pooled differently:

- Mixed_5b..5d (InceptionA), Mixed_6b..6e (InceptionC), Mixed_7b (first InceptionE): the 3x3
  average pool of the pool branch ignores the zero padding (`count_include_pad=False`);
- Mixed_7c (second InceptionE): the pool branch is a 3x3 *max* pool.

Inputs are resized to 299x299 (bilinear) and mapped from [0, 1] to [-1, 1]. No weights are
downloaded: the user gives the file's path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.inception import BasicConv2d, Inception3, InceptionAux, InceptionB, InceptionC, InceptionD
from torchvision.models.inception import InceptionA, InceptionE

FEATURE_DIM = 2048
NUM_FID_CLASSES = 1008  # the TF graph's classifier has 1008 outputs; its weights are in the file
INPUT_SIZE = 299


def _avg_pool_no_pad(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """InceptionA whose pool branch averages over real pixels only, as TF did."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_no_pad(x))]


class FIDInceptionC(InceptionC):
    """InceptionC whose pool branch averages over real pixels only, as TF did."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_no_pad(x))]


class FIDInceptionE(InceptionE):
    """InceptionE with TF's pool branch: `pool="avg"` (Mixed_7b, padding excluded) or `"max"` (Mixed_7c)."""

    def __init__(self, in_channels: int, pool: str = "avg", **kwargs):
        super().__init__(in_channels, **kwargs)
        if pool not in ("avg", "max"):
            raise ValueError(f"FIDInceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool

    def _forward(self, x: Tensor) -> list[Tensor]:
        b3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_no_pad(x)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]


class FIDInception3(Inception3):
    """torchvision's Inception3 skeleton (same parameter names) with the FID blocks swapped in."""

    def __init__(self):
        blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE, InceptionAux]
        # init_weights=False: the weights come from the file; the default init is slow (scipy truncnorm)
        super().__init__(num_classes=NUM_FID_CLASSES, aux_logits=False, transform_input=False,
                         inception_blocks=blocks, init_weights=False)
        self.Mixed_7c = FIDInceptionE(2048, pool="max")

    def pool3(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048)."""
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0                                                        # (N, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))    # (N, 64, 147, 147)
        x = self.maxpool1(x)                                                     # (N, 64, 73, 73)
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))         # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                      # (N, 288, 35, 35)
        x = self.Mixed_6a(x)                                                     # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))      # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                      # (N, 2048, 8, 8)
        return torch.flatten(self.avgpool(x), 1)                                 # (N, 2048)


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInception3:
    """Build the FID Inception and load a pytorch-fid state dict from `path`, strictly.

    The file is read with `weights_only=True` (tensors only, no code). BatchNorm step counters
    (`num_batches_tracked`) are bookkeeping that some exports omit; they are filled in, every real
    weight must be present with the right shape, and no unknown key is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {path} not found; pass the pytorch-fid file "
            "pt_inception-2015-12-05-6726825d.pth (download it once from the pytorch-fid releases page)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code, a truncated file, or not a torch file at all
        raise ValueError(f"cannot read {path} as a tensor-only state dict ({err}); "
                         "expected the pytorch-fid pt_inception-2015-12-05-*.pth file") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; "
                         "expected the pytorch-fid pt_inception-2015-12-05-*.pth file")
    model = FIDInception3()
    expected = model.state_dict()
    state = dict(state)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} is not a pytorch-fid Inception state dict: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} wrong shapes {wrong[:3]}; "
            "use pt_inception-2015-12-05-6726825d.pth from pytorch-fid (not torchvision's inception_v3 weights)")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


class InceptionFeatures:
    """Feature extractor: uint8 images (N, H, W, 3) -> FID pool3 features (N, 2048) as float64."""

    name = "inception-v3-fid"
    dim = FEATURE_DIM
    image_size = INPUT_SIZE  # images are read at the network's input size, not upsampled from 32 px

    def __init__(self, weights: str | Path, device: str = "cpu", batch_size: int = 32):
        self.model = load_fid_inception(weights, device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size]))
            x = batch.to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
            out.append(self.model.pool3(x).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))
