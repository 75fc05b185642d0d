"""The FID Inception-v3 loads a pytorch-fid-format state dict strictly and gives 2048-d features; its
pool branches behave as TensorFlow's did (no download: the test writes a file in that format)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.inception import Inception3, InceptionA

from drivedit.eval.inception import FIDInception3, FIDInceptionA, FIDInceptionE, InceptionFeatures, load_fid_inception


@pytest.fixture(scope="module")
def fid_state() -> dict:
    """A state dict shaped like pt_inception-2015-12-05-6726825d.pth: torchvision's key names with a
    1008-way fc and no aux head, as a plain dict of tensors (random values, BN stats sane)."""
    skeleton = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, t in skeleton.items():
        if key.endswith("num_batches_tracked"):
            continue  # left out as some exports do; the loader must cope
        if key.endswith("running_var"):
            state[key] = torch.rand(t.shape, generator=gen) + 0.5
        elif key.endswith("running_mean") or key.endswith("bn.bias") or key == "fc.bias":
            state[key] = torch.randn(t.shape, generator=gen) * 0.1
        elif key.endswith("bn.weight"):
            state[key] = torch.ones(t.shape)
        else:  # conv / fc weights, scaled by fan-in so activations stay O(1) through 90-odd layers
            fan_in = int(np.prod(t.shape[1:]))
            state[key] = torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5
    return state


def test_loads_strictly_and_gives_2048_features(tmp_path, fid_state):
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(fid_state, path)
    model = load_fid_inception(path)
    loaded = model.state_dict()
    assert set(loaded) - set(fid_state) == {k for k in loaded if k.endswith("num_batches_tracked")}
    for key, value in fid_state.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["fc.weight"].shape == (1008, 2048)

    images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    feats = InceptionFeatures(path, batch_size=1)(images)  # two batches of one
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert (feats >= 0).all() and feats.std() > 0  # pool3 follows ReLUs


def test_state_dict_with_counters_also_loads(tmp_path, fid_state):
    full = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    with_counters = {**fid_state, **{k: v for k, v in full.items() if k.endswith("num_batches_tracked")}}
    torch.save(with_counters, tmp_path / "w.pth")
    model = load_fid_inception(tmp_path / "w.pth")
    loaded = model.state_dict()
    for name in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight"):
        assert torch.equal(loaded[name], fid_state[name])  # the file's weights, not a fresh init


def test_wrong_files_are_refused_with_the_reason(tmp_path, fid_state):
    missing = dict(fid_state)
    del missing["Mixed_7c.branch_pool.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="1 missing keys.*Mixed_7c.branch_pool.conv.weight"):
        load_fid_inception(tmp_path / "missing.pth")

    imagenet = dict(fid_state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(imagenet, tmp_path / "torchvision.pth")
    with pytest.raises(ValueError, match="wrong shapes.*fc"):
        load_fid_inception(tmp_path / "torchvision.pth")

    torch.save({"weights": fid_state, "note": object.__new__(InceptionA)}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="tensor-only"):
        load_fid_inception(tmp_path / "pickle.pth")
    with pytest.raises(FileNotFoundError, match="pytorch-fid"):
        load_fid_inception(tmp_path / "absent.pth")


def test_pool_branches_follow_tensorflow():
    torch.manual_seed(0)
    # average pool excluding padding: on a constant input the pool branch sees the constant at the
    # border too, so the block's pool-branch output is spatially constant; torchvision's is not
    ours, theirs = FIDInceptionA(8, pool_features=4).eval(), InceptionA(8, pool_features=4).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.full((1, 8, 7, 7), 2.0)
    with torch.no_grad():
        pool_ours, pool_theirs = ours(x)[:, -4:], theirs(x)[:, -4:]
    assert torch.allclose(pool_ours, pool_ours[:, :, 3:4, 3:4].expand_as(pool_ours), atol=1e-6)
    assert not torch.allclose(pool_theirs[:, :, 0, 0], pool_theirs[:, :, 3, 3], atol=1e-3)
    assert torch.allclose(pool_ours[:, :, 3, 3], pool_theirs[:, :, 3, 3], atol=1e-6)  # same inside

    # Mixed_7c pools with max: a single bright pixel reaches exactly its 3x3 neighbourhood
    block = FIDInceptionE(4, pool="max").eval()
    assert isinstance(FIDInception3().Mixed_7c, FIDInceptionE) and FIDInception3().Mixed_7c.pool == "max"
    x = torch.zeros(1, 4, 6, 6)
    x[0, :, 2, 2] = 5.0
    with torch.no_grad():
        pooled_in = block.branch_pool(F.max_pool2d(x, 3, 1, 1))
        out = block(x)[:, -192:]
    assert torch.allclose(out, pooled_in)
    changed = (out - block.branch_pool(torch.zeros_like(x))).abs().sum(1)[0] > 1e-6  # (6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[1:4, 1:4] = True
    assert torch.equal(changed, expected)
