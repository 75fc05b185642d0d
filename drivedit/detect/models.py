"""Detectors: a torchvision detection head (Faster R-CNN, FCOS, RetinaNet) on a ResNet-FPN or on DiT
features, sized for small images; weights files in torchvision's format; the saved detector.

Every backbone returns the same five levels, `"0"`..`"3"` and `"pool"` at strides 4, 8, 16, 32 and
64, so a head is built the same way whatever feeds it. torchvision's defaults assume 800 px COCO
images: anchors of 32-512 px and a resize to 800. At 128 px the objects are 3-60 px, so anchors are
8-128 px (one size per level, three aspect ratios) and the model's own resize is pinned to the
image size (a no-op for the square images the dataset produces).

A saved detector is a directory: `detector.safetensors` (the whole state dict, DiT and VAE
included, so it loads without the sources it was built from) and `detector.json` (how to rebuild
the module: arch, backbone, categories, image size and, for the DiT backbone, the DiT and VAE
configs). `detector.json` is written last; it marks a complete detector.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DETECTOR_FILE = "detector.json"
WEIGHTS_FILE = "detector.safetensors"
ANCHOR_SIZES = (8, 16, 32, 64, 128)  # one per pyramid level, strides 4..64, for 128 px images
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def resnet_fpn(name: str, channels: int) -> nn.Module:
    """A randomly initialised ResNet-FPN with trainable BatchNorm (torchvision's frozen BN only makes sense
    for pretrained weights), levels "0".."3" + "pool" with `channels` each (torchvision's 256 makes the heads
    16x the work of 64 at no gain on small images)."""
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    body = getattr(resnet, name)(weights=None, norm_layer=nn.BatchNorm2d)
    width = 64 if name in ("resnet18", "resnet34") else 256  # layer1's output; each later layer doubles it
    return BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)}, [width * 2 ** i for i in range(4)],
                           channels, extra_blocks=LastLevelMaxPool())


def build_head(arch: str, backbone: nn.Module, num_classes: int, image_size: int, mean: list[float],
               std: list[float], max_detections: int = 100, score_threshold: float = 0.01) -> nn.Module:
    """A torchvision detector of `arch` on `backbone` (any module returning the five levels, with
    `out_channels`). `num_classes` counts the categories; labels are 1..num_classes (0 is background)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    scale = image_size / 128
    sizes = tuple((max(2, round(s * scale)),) for s in ANCHOR_SIZES)
    common = {"min_size": image_size, "max_size": image_size, "image_mean": mean, "image_std": std}
    if arch == "fasterrcnn":
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        from drivedit.detect.ignore_regions import with_ignore_regions

        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        # proposal and RoI counts for a few dozen objects per small image rather than COCO's 800 px
        # (the RoI head's 512 RoIs x 1024-wide MLP per image would be most of the CPU time)
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, 256)
        model = FasterRCNN(backbone, rpn_anchor_generator=anchors, box_head=box_head,
                           box_predictor=FastRCNNPredictor(256, num_classes + 1),
                           rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                           rpn_post_nms_top_n_test=150, box_batch_size_per_image=128,
                           box_detections_per_img=max_detections, box_score_thresh=score_threshold, **common)
        return with_ignore_regions(model)  # targets' ignore_boxes: drivedit.detect.ignore_regions
    if arch == "retinanet":
        # RetinaNet's three scales per octave, from each level's base size
        anchors = AnchorGenerator(tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for (s,) in sizes),
                                  ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(backbone, num_classes=num_classes + 1, anchor_generator=anchors,
                         detections_per_img=max_detections, score_thresh=score_threshold, **common)
    if arch == "fcos":
        anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))  # FCOS: one point per location
        return FCOS(backbone, num_classes=num_classes + 1, anchor_generator=anchors,
                    detections_per_img=max_detections, score_thresh=score_threshold, **common)
    raise ValueError(f"unknown detector arch {arch!r}; use fasterrcnn, fcos or retinanet")


# ----------------------------------------------------------------------------- weights files


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (loaded with weights_only=True: never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # training scripts' {"model": state_dict, ...}
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return obj


def load_torchvision_weights(detector: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict:
    """Load a torchvision-format state dict: a whole detector's (`backbone.body.*`, `backbone.fpn.*`, heads) or
    a plain ResNet's (`conv1.weight`, `layer1.*`: ImageNet weights), into the detector's matching tensors.
    Tensors of another shape (a head for another number of classes) are skipped and listed. Raises when
    nothing matches."""
    own = detector.state_dict()
    if "conv1.weight" in state and not any(k.startswith("backbone.") for k in state):
        state = {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    loaded, skipped = {}, []
    for k, v in state.items():
        if k in own and own[k].shape == v.shape:
            loaded[k] = v
        elif k in own:
            skipped.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
    if not loaded:
        raise ValueError(f"{source}: none of its {len(state)} tensors fits the detector (expected torchvision "
                         f"detection names such as backbone.body.conv1.weight, or a ResNet's conv1.weight); "
                         f"first keys: {list(state)[:5]}")
    detector.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "skipped_shape": skipped, "not_in_file": len(set(own) - set(loaded))}


# ----------------------------------------------------------------------------- saved detectors


def save_detector(directory: str | Path, detector: nn.Module, spec: dict) -> Path:
    """Write detector.safetensors then detector.json (the completion marker) to a local directory."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}, str(d / WEIGHTS_FILE))
    (d / DETECTOR_FILE).write_text(json.dumps(spec, indent=1))
    return d


def read_spec(directory: str | Path) -> dict:
    p = Path(directory) / DETECTOR_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{directory} holds no {DETECTOR_FILE}: not a saved detector (a run's detector "
                                f"folder or a registered detector version)")
    return json.loads(p.read_text())


def load_state_checked(detector: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that lists every missing, unexpected and misshapen tensor in one error."""
    own = detector.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not fit the detector its {DETECTOR_FILE} describes: missing "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected "
                         f"{unexpected[:10]} ({len(unexpected)}), shape mismatches {shapes[:10]}")
    detector.load_state_dict(state)
