"""Ignore regions for Faster R-CNN: boxes the detector is neither taught to find nor to call background.

A generated frame's small boxes often do not hold (layout fidelity by object size: `drivedit eval`), yet
the picture usually shows *something* there. Training on such a box as a target teaches the detector to
find what is not drawn; leaving it out teaches it that whatever is drawn there is background. An ignore
region does neither: anchors (RPN) and proposals (RoI head) lying mostly inside one are dropped from the
samples the losses see, unless they already match a real target, the way crowd regions are treated in
COCO-style training.

Targets carry the regions as `ignore_boxes` (m, 4) in the same pixels as `boxes`. torchvision's transform
passes unknown keys through untouched and, with the size pinned to the image size (models.build_head),
resizes nothing, so the regions stay aligned with the boxes. The two subclasses add no state and no
weights: every Faster R-CNN drivedit builds uses them, and a target without `ignore_boxes` trains exactly
as torchvision's would.
"""
from __future__ import annotations

import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

IGNORE_KEY = "ignore_boxes"
INSIDE_SHARE = 0.5  # an anchor / proposal with more than half its area inside an ignore region is not sampled


def inside_share(boxes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(A,) the largest share of each box's area that lies inside one of the regions; boxes (A, 4), regions (M, 4),
    both x1, y1, x2, y2."""
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])  # (A, M, 2)
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])  # (A, M, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)  # (A, M)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1).clamp(min=1e-6)  # (A,)
    return (inter / area[:, None]).amax(dim=1)


def unsample_inside(labels: torch.Tensor, boxes: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
    """labels (A,) with the background samples (0) among `boxes` (A, 4) that lie mostly inside a region set to
    -1, the value both of torchvision's samplers skip."""
    if regions is None or not regions.numel():
        return labels
    inside = inside_share(boxes, regions.to(boxes)) > INSIDE_SHARE  # (A,)
    return torch.where((labels == 0) & inside, torch.full_like(labels, -1), labels)


class IgnoreRegionRPN(RegionProposalNetwork):
    """The RPN, with anchors inside ignore regions neither object nor background."""

    def assign_targets_to_anchors(self, anchors, targets):
        labels, matched = super().assign_targets_to_anchors(anchors, targets)
        labels = [unsample_inside(lab, a, t.get(IGNORE_KEY)) for lab, a, t in zip(labels, anchors, targets)]
        return labels, matched


class IgnoreRegionRoIHeads(RoIHeads):
    """The box head, with proposals inside ignore regions left out of the sampled background."""

    _regions: list | None = None

    def select_training_samples(self, proposals, targets):
        # torchvision's assignment receives the boxes and labels only: hand it this batch's regions on the side
        self._regions = [t.get(IGNORE_KEY) for t in targets] if targets is not None else None
        try:
            return super().select_training_samples(proposals, targets)
        finally:
            self._regions = None

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        if self._regions is not None:
            labels = [unsample_inside(lab, p, r) for lab, p, r in zip(labels, proposals, self._regions)]
        return matched, labels


def with_ignore_regions(model):
    """A torchvision FasterRCNN whose RPN and box head honour `ignore_boxes` (same modules, same weights)."""
    model.rpn.__class__ = IgnoreRegionRPN
    model.roi_heads.__class__ = IgnoreRegionRoIHeads
    return model
