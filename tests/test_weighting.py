"""Small-object loss weighting: lambda inside boxes, 1 outside; size_aware favours smaller objects, bounded."""
import pytest
import torch

from drivedit.train.weighting import component_areas, connected_components, object_weight


def _mask(boxes, n=1, h=16, w=16):
    m = torch.zeros(n, 1, h, w, dtype=torch.uint8)
    for i, (y0, y1, x0, x1) in boxes:
        m[i, 0, y0:y1, x0:x1] = 1
    return m


def test_flat_weight_is_lambda_inside_one_outside():
    m = _mask([(0, (2, 6, 2, 6)), (1, (0, 1, 0, 16))], n=2)
    w = object_weight(m, lam=2.5)
    assert w.shape == (2, 1, 16, 16)
    assert torch.all(w[m.bool()] == 2.5) and torch.all(w[~m.bool()] == 1.0)
    assert w.sum().item() == pytest.approx(2.5 * 32 + (512 - 32))


def test_components_and_areas():
    m = _mask([(0, (0, 2, 0, 2)), (0, (5, 8, 5, 9)), (0, (10, 11, 10, 11)), (0, (11, 12, 11, 12))])
    labels = connected_components(m.float())
    # the two diagonal cells touch at a corner: one 8-connected component
    assert len(labels.unique()) - 1 == 3
    areas = component_areas(labels)
    assert areas[0, 0, 0, 0] == 4 and areas[0, 0, 6, 6] == 12 and areas[0, 0, 10, 10] == 2
    assert areas[0, 0, 3, 3] == 0


def test_size_aware_orders_by_size_and_is_bounded():
    # separate objects of areas 1, 4, 16 and 64 on a 16x16 grid (ref area 16 = 256 / 16)
    m = _mask([(0, (0, 1, 0, 1)), (0, (3, 5, 0, 2)), (0, (0, 4, 8, 12)), (0, (8, 16, 0, 8))])
    w = object_weight(m, lam=2.0, size_aware=True, max_weight=5.0)
    tiny, small, mid, big = w[0, 0, 0, 0], w[0, 0, 3, 0], w[0, 0, 0, 8], w[0, 0, 8, 0]
    assert tiny == pytest.approx(5.0)  # 2 * sqrt(16 / 1) = 8, clamped to max_weight
    assert small == pytest.approx(4.0)  # 2 * sqrt(16 / 4)
    assert mid == pytest.approx(2.0)  # ref-sized: the paper's lambda
    assert big == pytest.approx(2.0)  # larger objects never fall below lambda
    assert tiny >= small > mid >= big
    assert torch.all(w[m == 0] == 1.0)
    # the same box gets the same weight wherever it is and whatever else is in the batch
    w2 = object_weight(_mask([(0, (3, 5, 0, 2))]), lam=2.0, size_aware=True, max_weight=5.0)
    assert w2[0, 0, 3, 0] == small


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\(N, 1, h, w\)"):
        object_weight(torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="max_weight"):
        object_weight(torch.zeros(1, 1, 4, 4), lam=2.0, size_aware=True, max_weight=1.5)
