"""Detector zoo for mtpd: torchvision RetinaNet / Mask R-CNN on ResNet, ResNeXt and Swin backbones.

`build_detector(name, num_classes, scale)` returns a plain torchvision detector (the training contract is
torchvision's: a list of [3, H, W] images in 0-1 and targets in, a loss dict out; detections in eval).
`retinanet_r50` and `maskrcnn_r50` are built exactly as torchvision's `retinanet_resnet50_fpn` /
`maskrcnn_resnet50_fpn` with `weights=None`, so their state_dicts (keys and shapes) are identical and
torchvision's COCO weights load with `strict=True`.

From scratch (no weights) every BatchNorm is a trainable `nn.BatchNorm2d` and every layer trains: the
`FrozenBatchNorm2d` / trainable_layers=3 defaults of torchvision are meant for pretrained backbones.
"""
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import resnet, swin_transformer
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from mtpd import stride_keyed

# Backbone body builders: name -> (constructor, channel widths of stages 1..4).
BODIES = {
    "r18": (resnet.resnet18, [64, 128, 256, 512]),
    "r34": (resnet.resnet34, [64, 128, 256, 512]),
    "r50": (resnet.resnet50, [256, 512, 1024, 2048]),
    "r101": (resnet.resnet101, [256, 512, 1024, 2048]),
    "x101": (resnet.resnext101_32x8d, [256, 512, 1024, 2048]),
    "swin_t": (swin_transformer.swin_t, [96, 192, 384, 768]),
    "swin_s": (swin_transformer.swin_s, [96, 192, 384, 768]),
}
ZOO = [f"retinanet_{b}" for b in ("r18", "r34", "r50", "r101", "x101", "swin_t", "swin_s")] + [
    f"maskrcnn_{b}" for b in ("r18", "r50", "swin_t")]


class SwinFPN(nn.Module):
    """Swin stages -> FPN. torchvision's Swin returns NHWC maps; the FPN wants NCHW.

    forward(x [N, 3, H, W]) -> OrderedDict of [N, out_channels, H/s, W/s] for the returned stages
    (stage i has stride 2**(i+1): 4, 8, 16, 32) plus the extra levels.
    """

    def __init__(self, swin, channels, stages, out_channels, extra_blocks):
        super().__init__()
        self.features = swin.features  # [patch-embed, stage1, merge, stage2, merge, stage3, merge, stage4]
        self.stages = stages  # indices 1..4 of the stages handed to the FPN
        self.fpn = FeaturePyramidNetwork([channels[s - 1] for s in stages], out_channels, extra_blocks)
        self.out_channels = out_channels

    def forward(self, x):
        feats = OrderedDict()
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 2 == 1 and (i + 1) // 2 in self.stages:  # after stage (i+1)//2
                feats[str(len(feats))] = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        return self.fpn(feats)


class Float32Anchors(AnchorGenerator):
    """torchvision's AnchorGenerator, but its anchors are float32 even under bf16 autocast: it takes the
    dtype of the feature maps, and bf16's 8-bit mantissa would put anchors ~1 px off at 256 px (4 px at
    800). Only the maps' sizes are used, so empty float32 stand-ins are passed. No parameters: the
    state_dict is unchanged."""

    def forward(self, image_list, feature_maps):
        return super().forward(image_list, [f.new_empty((1, 1, *f.shape[-2:]), dtype=torch.float32)
                                            for f in feature_maps])


def _backbone(body, fpn_channels, two_stage, zero_init_residual):
    """Backbone + FPN. RetinaNet: C3-C5 -> P3-P7 (P6/P7 from P5, as torchvision's v1); Mask R-CNN:
    C2-C5 -> P2-P5 + max-pooled P6."""
    make, channels = BODIES[body]
    stages = [1, 2, 3, 4] if two_stage else [2, 3, 4]
    extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(fpn_channels, fpn_channels)
    if body.startswith("swin"):
        return SwinFPN(make(weights=None), channels, stages, fpn_channels, extra)
    net = make(weights=None, norm_layer=nn.BatchNorm2d, zero_init_residual=zero_init_residual)
    # What torchvision's _resnet_fpn_extractor builds (same module names), with a free FPN width.
    return BackboneWithFPN(net, {f"layer{s}": str(i) for i, s in enumerate(stages)},
                           [channels[s - 1] for s in stages], fpn_channels, extra_blocks=extra)


def build_detector(name, num_classes, scale=1.0, min_size=800, max_size=1333, fpn_channels=256,
                   head_convs=4, anchor_base=32, zero_init_residual=False):
    """Build a detector from the zoo, from scratch.

    name: 'retinanet_<body>' or 'maskrcnn_<body>' (see ZOO).
    num_classes: torchvision's convention, label 0 included (background): K dataset classes -> K + 1.
    scale: input resolution factor; the transform resizes images to min_size*scale (max max_size*scale).
    fpn_channels, head_convs: FPN width and RetinaNet convs per subnet (256 and 4 are torchvision's).
    anchor_base: anchor size at the finest level in *original-image* pixels (torchvision: 32 at P3 for
    RetinaNet / P2 for Mask R-CNN), doubling per level; multiplied by `scale` so that every resolution
    covers the same objects.
    zero_init_residual: zero the last BN of each residual block (makes a from-scratch R50 train fast).
    """
    kind, _, body = name.partition("_")
    if name not in ZOO:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(ZOO)}")
    two_stage = kind == "maskrcnn"
    backbone = _backbone(body, fpn_channels, two_stage, zero_init_residual)
    sizes = tuple((int(anchor_base * scale * 2 ** i),) for i in range(5))
    lo, hi = round(min_size * scale), round(max_size * scale)
    if not two_stage:
        # torchvision's RetinaNet anchors: 3 scales x 3 aspect ratios per level.
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for (s,) in sizes)
        anchors = Float32Anchors(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
        if head_convs != 4:  # a lighter head: RetinaNet's head dominates the step at small image sizes
            for sub in (head.classification_head, head.regression_head):
                sub.conv = sub.conv[:head_convs]
        model = RetinaNet(backbone, num_classes, min_size=lo, max_size=hi, anchor_generator=anchors,
                          head=head)
    else:
        # Mask R-CNN with proposal counts and RoI batches that train on a CPU at small sizes (METHOD §6).
        anchors = Float32Anchors(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        cpu = dict(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                   rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)
        if min_size >= 800:
            cpu = {}  # full-size images: torchvision's defaults
        model = MaskRCNN(backbone, num_classes, min_size=lo, max_size=hi, rpn_anchor_generator=anchors,
                         **cpu)
    model.spec_name = name
    return model


def fpn_features(model, images):
    """The neck outputs of `model` for a list of images, keyed by stride (§3.1). The heads never run.

    images: list of [3, H, W] in 0-1 (the same augmented batch the student sees).
    Returns {stride: [N, C, H/stride, W/stride]}, computed at the model's own input resolution.
    """
    batch, _ = model.transform(images)
    x = batch.tensors
    return stride_keyed(x.shape[-2:], model.backbone(x))


def count_params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # python models.py: the zoo, with parameter counts
    for n in ZOO:
        print(f"{n:20s} {count_params(build_detector(n, 91)) / 1e6:7.1f} M")
