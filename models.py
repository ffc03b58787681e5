"""Detector zoo for mtpd: torchvision RetinaNet / FCOS / Faster R-CNN / Mask R-CNN on ResNet, ResNeXt, Swin.

`build_detector(name, num_classes, scale)` returns a plain torchvision detector (the training contract is
torchvision's: a list of [3, H, W] images in 0-1 and targets in, a loss dict out; detections in eval).
The names in TORCHVISION are built exactly as torchvision's builders with `weights=None` (same module
tree, so the state_dicts have the same keys and shapes) and torchvision's COCO weights load into them with
`load_weights`; `load_backbone_weights` puts ImageNet weights into the body of any ResNet or Swin model.

From scratch every BatchNorm is a trainable `nn.BatchNorm2d` and every layer trains. With
`pretrained=True` the model is built as torchvision builds it for given weights: `FrozenBatchNorm2d` in
the ResNet body (v1 models; the v2 recipe keeps BatchNorm2d) and conv1/layer1 frozen (trainable_layers=3),
so finetuning with small batches behaves like torchvision. The state_dict keys are the same either way.
"""
import math
import os
import re
from collections import OrderedDict
from functools import partial
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import get_weight, resnet, swin_transformer
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from mtpd import eval_mode, stride_keyed

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
# Our name -> the torchvision builder it equals (default widths: 256-channel FPN, 4 head convs).
TORCHVISION = {
    "retinanet_r50": "retinanet_resnet50_fpn", "retinanet_r50_v2": "retinanet_resnet50_fpn_v2",
    "fcos_r50": "fcos_resnet50_fpn",
    "fasterrcnn_r50": "fasterrcnn_resnet50_fpn", "fasterrcnn_r50_v2": "fasterrcnn_resnet50_fpn_v2",
    "maskrcnn_r50": "maskrcnn_resnet50_fpn", "maskrcnn_r50_v2": "maskrcnn_resnet50_fpn_v2",
}
ZOO = ([f"retinanet_{b}" for b in ("r18", "r34", "r50", "r101", "x101", "swin_t", "swin_s")]
       + ["retinanet_r50_v2", "fcos_r18", "fcos_r50", "fasterrcnn_r18", "fasterrcnn_r50", "fasterrcnn_r50_v2",
          "maskrcnn_r18", "maskrcnn_r50", "maskrcnn_swin_t", "maskrcnn_r50_v2"])
# torchvision trained these with FrozenBatchNorm2d eps 0 and sets it when loading them (overwrite_eps).
EPS0 = {"RetinaNet_ResNet50_FPN_Weights.COCO_V1", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
        "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"}
CLASS_LAYERS = re.compile(r"(cls_logits|cls_score|bbox_pred|mask_fcn_logits)\.")  # shapes depend on K


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
    state_dict is unchanged.

    Float anchors alone do not give float32 boxes: torchvision's box coders cast the anchors (and the RPN's
    proposals) to the dtype of the regression output before decoding, so build_detector also hooks the
    heads to return float32 (float32_outputs)."""

    def forward(self, image_list, feature_maps):
        return super().forward(image_list, [f.new_empty((1, 1, *f.shape[-2:]), dtype=torch.float32)
                                            for f in feature_maps])


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --precision -> dtype


def autocast(device, precision):
    """The autocast context of a precision (disabled for fp32): training, evaluation and the cache run the
    models under it. The feature loss, the anchors, P6/P7 and the boxes stay float32 under it
    (mtpd.feature_loss, float32_outputs)."""
    device = torch.device(device)
    return torch.autocast(device.type, DTYPES[precision], enabled=precision != "fp32")


def _float32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    if isinstance(x, dict):
        return {k: _float32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float32(v) for v in x)
    return x


def float32_outputs(module, args, output):
    """Forward hook: the module's bf16/fp16 outputs (nested in dicts, lists, tuples) as float32.

    Put on the modules whose outputs are decoded into boxes and scores (RetinaNet/FCOS `head`, R-CNN
    `rpn.head`, `roi_heads.box_predictor` and `mask_predictor`). torchvision's BoxCoder.decode_single and
    BoxLinearCoder.decode cast the reference boxes to the regression output's dtype, so under autocast the
    decoded boxes would be bf16 (a 4 px grid at 512-1024 px, 8 px beyond), and so would scores and masks.
    The head itself still runs under autocast; everything after it (decoding, sigmoid/softmax, top-k, NMS,
    RoI boxes, mask paste, the losses) runs in float32. float32 and float64 outputs pass as they are.
    A module-level function, so that hooked models pickle and deep-copy; hooks are not in the state_dict,
    and a head swapped in after build_detector needs `m.register_forward_hook(float32_outputs)` again."""
    return _float32(output)


class Float32P6P7(LastLevelP6P7):
    """torchvision's P6/P7 block, run in float32 even under bf16 autocast: oneDNN's bf16 convolution
    backward on a CPU returns NaN weight gradients for a 1x1 input map (measured: 6 of 150 steps of a
    RetinaNet-R18 at 64 px, whose P6 is 1x1). The maps are a few cells: float32 costs nothing there.
    Same parameters and state_dict keys."""

    def forward(self, p, c, names):
        device = p[-1].device.type
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return super().forward(p, c, names)
        with torch.autocast(device, enabled=False):
            return super().forward(p[:-1] + [p[-1].float()], c[:-1] + [c[-1].float()], names)


class FrozenBN(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (fixed statistics and affine) that keeps BatchNorm2d's
    `num_batches_tracked`, so a model has the same state_dict keys built for finetuning or from scratch.
    A state_dict saved from a FrozenBatchNorm2d model (no such key) still loads strictly."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__(num_features, eps)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked.clone())
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args)  # not the parent's: it drops the key


def _backbone(body, fpn_channels, stages, extra, zero_init_residual, frozen_bn, frozen_stem, fpn_norm=None):
    """Backbone + FPN over the given stages (1..4 = C2..C5), as torchvision's _resnet_fpn_extractor builds it
    (same module names) but with a free FPN width. frozen_stem: conv1 and layer1 do not train."""
    make, channels = BODIES[body]
    if body.startswith("swin"):  # nothing frozen: the Swin detectors of mmdet train every stage
        return SwinFPN(make(weights=None), channels, stages, fpn_channels, extra)
    net = make(weights=None, norm_layer=FrozenBN if frozen_bn else nn.BatchNorm2d,
               zero_init_residual=zero_init_residual)
    if frozen_stem:  # torchvision's trainable_layers=3 for a pretrained body
        for n, p in net.named_parameters():
            p.requires_grad_(n.startswith(("layer2", "layer3", "layer4")))
    return BackboneWithFPN(net, {f"layer{s}": str(i) for i, s in enumerate(stages)},
                           [channels[s - 1] for s in stages], fpn_channels, extra_blocks=extra,
                           norm_layer=fpn_norm)


def build_detector(name, num_classes, scale=1.0, min_size=800, max_size=1333, fpn_channels=256,
                   head_convs=4, anchor_base=32, zero_init_residual=False, pretrained=False, head_gn=False):
    """Build a detector from the zoo, with fresh weights.

    name: '<retinanet|fcos|fasterrcnn|maskrcnn>_<body>[_v2]' (see ZOO; TORCHVISION for the exact ones).
    num_classes: torchvision's convention, label 0 included (background): K dataset classes -> K + 1.
    scale: input resolution factor; the transform resizes images to min_size*scale (max max_size*scale).
    fpn_channels, head_convs: FPN width and convs per RetinaNet/FCOS head subnet (256 and 4 are
    torchvision's); the R-CNN box and mask heads are torchvision's whatever the FPN width.
    anchor_base: anchor size at the finest level in *original-image* pixels (torchvision: 32 at P3 for
    RetinaNet / P2 for R-CNN; FCOS's one "anchor" per location is anchor_base/4 = 8 at P3), doubling per
    level; multiplied by `scale` so that every resolution covers the same objects.
    zero_init_residual: zero the last BN of each residual block (makes a from-scratch R50 train fast).
    pretrained: build for weights that will be loaded (FrozenBatchNorm2d, frozen conv1/layer1; see top).
    head_gn: GroupNorm after each conv of a RetinaNet's head subnets, as torchvision's v2 head (FCOS's head
    always has it): from scratch it trains faster (RESULTS.md, "A recipe that converges sooner").
    Under autocast, boxes, scores and masks come out float32 (Float32Anchors, float32_outputs).
    """
    if name not in ZOO:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(ZOO)}")
    kind, _, body = name.partition("_")
    v2 = body.endswith("_v2")
    body = body.removesuffix("_v2")
    two_stage = kind in ("fasterrcnn", "maskrcnn")
    c5 = BODIES[body][1][-1]
    if two_stage:  # C2-C5 -> P2-P5 + max-pooled P6
        stages, extra = [1, 2, 3, 4], LastLevelMaxPool()
    else:  # C3-C5 -> P3-P7; P6 from P5 (v1, FCOS) or from C5 (RetinaNet v2)
        stages, extra = [2, 3, 4], Float32P6P7(c5 if v2 else fpn_channels, fpn_channels)
    backbone = _backbone(body, fpn_channels, stages, extra, zero_init_residual,
                         frozen_bn=pretrained and not v2, frozen_stem=pretrained,
                         fpn_norm=nn.BatchNorm2d if v2 and two_stage else None)
    sizes = [int(anchor_base * scale * 2 ** i) for i in range(5)]  # one base size per level
    lo, hi = round(min_size * scale), round(max_size * scale)
    if kind == "retinanet":
        model = _retinanet(backbone, num_classes, fpn_channels, head_convs, sizes, lo, hi, v2, head_gn)
    elif kind == "fcos":
        model = _fcos(backbone, num_classes, fpn_channels, head_convs, anchor_base * scale, lo, hi)
    else:
        model = _rcnn(kind, backbone, num_classes, fpn_channels, sizes, lo, hi, v2, min_size)
    # Under autocast, the outputs decoded into boxes, scores and masks become float32 (float32_outputs).
    if two_stage:
        decoded = [model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor]
    else:
        decoded = [model.head]
    for m in decoded:
        if m is not None:  # Faster R-CNN: no mask predictor
            m.register_forward_hook(float32_outputs)
    model.spec_name = name
    return model


def _group_norm(channels):
    return partial(nn.GroupNorm, math.gcd(32, channels))  # torchvision's 32 groups; fewer if narrower


def _retinanet(backbone, num_classes, fpn_channels, head_convs, sizes, lo, hi, v2, head_gn=False):
    """RetinaNet: 3 scales x 3 aspect ratios per level, `head_convs` convs per head subnet, GroupNorm in
    them with v2 or head_gn."""
    anchors = Float32Anchors(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes),
                             ((0.5, 1.0, 2.0),) * 5)
    gn = _group_norm(fpn_channels) if v2 or head_gn else None
    head = RetinaNetHead(fpn_channels, 9, num_classes, norm_layer=gn)
    for sub in (head.classification_head, head.regression_head):
        sub.conv = sub.conv[:head_convs]  # a lighter head: it dominates the step at small image sizes
    if v2:
        head.regression_head._loss_type = "giou"  # as torchvision's v2 builder
    return RetinaNet(backbone, num_classes, min_size=lo, max_size=hi, anchor_generator=anchors, head=head)


def _fcos(backbone, num_classes, fpn_channels, head_convs, base, lo, hi):
    """FCOS. One anchor per location: its centre is the point, its size both normalises the regression
    targets and sets each level's range of object sizes (4-8x the size). The centre-sampling radius is
    in anchor sizes: rescaled so it stays 1.5 strides whatever the anchors. base: anchor_base * scale."""
    r = base / 32  # 1 with torchvision's defaults: anchors 8..128 = the strides
    anchors = Float32Anchors(tuple((8 * r * 2 ** i,) for i in range(5)), ((1.0,),) * 5)
    gn = _group_norm(fpn_channels)
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=0)  # its subnets hard-code GroupNorm(32, C)
    head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, head_convs, norm_layer=gn)
    head.regression_head = FCOSRegressionHead(fpn_channels, 1, head_convs, norm_layer=gn)
    return FCOS(backbone, num_classes, min_size=lo, max_size=hi, anchor_generator=anchors, head=head,
                center_sampling_radius=1.5 / r)


def _rcnn(kind, backbone, num_classes, fpn_channels, sizes, lo, hi, v2, min_size):
    """Faster or Mask R-CNN, with proposal counts and RoI batches that train on a CPU at small sizes (the
    defaults: ~15x a RetinaNet step)."""
    anchors = Float32Anchors(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)
    kw = {} if min_size >= 800 else dict(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                                         rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                                         box_batch_size_per_image=64)
    if v2:  # torchvision's v2: 2-conv RPN, 4-conv box head and mask head with BatchNorm
        bn = nn.BatchNorm2d
        kw.update(rpn_head=RPNHead(fpn_channels, 3, conv_depth=2),
                  box_head=FastRCNNConvFCHead((fpn_channels, 7, 7), [256] * 4, [1024], bn))
        if kind == "maskrcnn":
            kw["mask_head"] = MaskRCNNHeads(fpn_channels, [256] * 4, 1, bn)
    make = MaskRCNN if kind == "maskrcnn" else FasterRCNN
    return make(backbone, num_classes, min_size=lo, max_size=hi, rpn_anchor_generator=anchors, **kw)


def fpn_features(model, images):
    """The neck outputs of `model` for a list of images, keyed by stride (§3.1). The heads never run.

    images: list of [3, H, W] in 0-1 (the same augmented batch the student sees).
    Returns {stride: [N, C, H/stride, W/stride]}, computed at the model's own input resolution.
    """
    batch, _ = model.transform(images)
    x = batch.tensors
    return stride_keyed(x.shape[-2:], model.backbone(x), batch.image_sizes)


FPN_BLOCK = re.compile(r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(.*)")


def _roles(model, strides):
    """state_dict key -> the role it plays in the neck or head, comparable across detectors:
    FPN lateral/output blocks by the *stride* of their level (a Mask R-CNN's block 1 is stride 8, a
    RetinaNet's block 0 is), extra levels (P6/P7) and head tensors by name. The body has no role here."""
    roles = {}
    for key in model.state_dict():
        m = FPN_BLOCK.fullmatch(key)
        if m:
            roles[key] = (m[1], strides[int(m[2])], m[3])
        elif key.startswith(("backbone.fpn.", "head.", "rpn.", "roi_heads.")):
            roles[key] = (type(model).__name__ if not key.startswith("backbone.") else "fpn", key)
    return roles


@torch.no_grad()
def inherit(student, teacher, images):
    """The inheriting strategy of the authors' code (and of FGD's and MGD's): before the first stage, copy
    the teacher's neck (FPN) and head tensors into the student wherever they play the same role and have
    the same shape. It starts the student in the teacher's feature basis, which an identity adapter
    would otherwise have to learn. The body (backbone) keeps the student's own weights.

    images: one batch (list of [3, H, W]) to read each model's FPN strides off. Heads are copied only
    between detectors of one type (RetinaNet <- RetinaNet). Returns (copied, candidates): how many of the
    student's neck/head tensors were copied. Raises ValueError when nothing could be.
    """
    with eval_mode(student, teacher):  # this forward leaves the BatchNorm statistics alone
        s_strides, t_strides = (sorted(fpn_features(m, images[:1])) for m in (student, teacher))
    s_roles, t_roles = _roles(student, s_strides), _roles(teacher, t_strides)
    by_role = {role: key for key, role in t_roles.items()}
    own, theirs = student.state_dict(), teacher.state_dict()
    copied = 0
    for key, role in s_roles.items():
        src = by_role.get(role)
        if src is not None and theirs[src].shape == own[key].shape:
            own[key].copy_(theirs[src])  # state_dict tensors share storage with the parameters
            copied += 1
    if not copied:
        raise ValueError(f"nothing to inherit: no neck or head tensor of the {type(teacher).__name__} "
                         f"teacher has the role and shape of one of the {type(student).__name__} student's")
    return copied, len(s_roles)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Weights: torchvision's COCO / ImageNet weights by name (torch hub cache, else downloaded), or a local file.
# ---------------------------------------------------------------------------------------------------------
def _read(path):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, or pickled code that weights_only refuses
        raise ValueError(f"cannot read weights {path}: {str(e).splitlines()[0][:160]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]  # an mtpd checkpoint
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state_dict")
    return sd


def read_weights(source):
    """(state_dict, where it came from) for a torchvision weights name such as
    'RetinaNet_ResNet50_FPN_Weights.COCO_V1' or a local file (a state_dict, or a dict with 'model')."""
    if os.path.isfile(source):
        return _read(source), source
    try:
        weights = get_weight(source)
    except (ValueError, KeyError):
        raise ValueError(f"weights '{source}': no such file, and not a torchvision weights name "
                         "(like RetinaNet_ResNet50_FPN_Weights.COCO_V1)") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    if os.path.isfile(path):
        return _read(path), path
    try:  # torchvision's download into that cache, with its hash check
        sd = weights.get_state_dict(progress=True, check_hash=True, weights_only=True, map_location="cpu")
        return sd, path
    except Exception as e:
        raise ValueError(f"cannot download {source} ({type(e).__name__}: {str(e).splitlines()[0][:80]}): "
                         f"put {weights.url} at {path}") from None


def _check(what, own, sd, allowed=()):
    """Fill num_batches_tracked where `sd` lacks it (saved from FrozenBatchNorm2d); raise a one-line
    ValueError on missing / unexpected keys or shapes that differ, except keys in `allowed`'s pattern."""
    sd = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **sd}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    fresh = [k for k in shapes if allowed and allowed.search(k)]
    shapes = [f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}" for k in shapes if k not in fresh]
    errors = [f"{len(x)} {n} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
              for n, x in (("missing", missing), ("unexpected", unexpected), ("of other shape", shapes)) if x]
    if errors:
        raise ValueError(f"{what}: " + "; ".join(errors))
    return {k: v for k, v in sd.items() if k not in fresh}, fresh


def _select_classes(sd, own, category_ids):
    """Cut, in place, the class layers of weights whose label is the category id (torchvision's COCO
    weights: 91 classes) to background + `category_ids`, in label order; returns the keys cut. Rows are
    anchor-major (anchor a, class k at a*K + k: RetinaNet's cls_logits; one anchor elsewhere) except
    bbox_pred's (class k, coordinate j at k*4 + j)."""
    idx, cut = torch.tensor([0, *category_ids]), []
    for k, v in sd.items():
        if CLASS_LAYERS.search(k) and k in own and v.shape != own[k].shape:
            m = own[k].shape[0] // len(idx)  # anchors, or box coordinates, per class
            n = v.shape[0] // m  # classes in the weights
            if v.shape[0] % m or n <= idx.max():
                raise ValueError(f"{k} {list(v.shape)}: not indexed by category ids up to {idx.max().item()}")
            v = (v.reshape(n, m, *v.shape[1:])[idx] if "bbox_pred" in k
                 else v.reshape(m, n, *v.shape[1:])[:, idx])
            sd[k] = v.reshape(own[k].shape)
            cut.append(k)
    return cut


def load_weights(model, source, num_classes, category_ids=None):
    """Load a whole detector's weights (torchvision name or file, see read_weights) strictly into `model`.

    When the weights have another number of classes, every other tensor (backbone, FPN, RPN, box/mask head
    trunks) is kept and the class-dependent layers (cls_logits / cls_score, bbox_pred / mask_fcn_logits)
    stay fresh for num_classes, unless `category_ids` (label i <-> category_ids[i - 1], as data.py maps
    them) says the weights index classes by category id, as torchvision's COCO weights do: then those
    rows are kept and the model predicts the dataset's labels. Returns a one-line description; raises a
    one-line ValueError otherwise.
    """
    if category_ids is not None and len(category_ids) + 1 != num_classes:
        raise ValueError(f"{len(category_ids)} category ids make {len(category_ids) + 1} classes, "
                         f"not {num_classes}")
    sd, where = read_weights(source)
    own = model.state_dict()
    sd = dict(sd)
    cut = _select_classes(sd, own, category_ids) if category_ids is not None else []
    sd, fresh = _check(f"weights {where} do not fit {getattr(model, 'spec_name', 'the model')}", own, sd,
                       CLASS_LAYERS)
    model.load_state_dict(sd, strict=not fresh)
    if source in EPS0:
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = 0.0
    if not fresh:
        return f"loaded {len(sd)} tensors from {where}" + (
            f"; {len(cut)} class layers cut to background + {len(category_ids)} category ids" if cut else "")
    parts = ", ".join(OrderedDict.fromkeys(".".join(k.split(".")[:2]) for k in sd))
    return (f"kept {len(sd)} tensors ({parts}) from {where}; fresh heads for {num_classes} classes: "
            f"{', '.join(fresh)}")


def load_backbone_weights(model, source):
    """ImageNet weights of a classification model (e.g. 'ResNet50_Weights.IMAGENET1K_V1',
    'Swin_T_Weights.IMAGENET1K_V1', or a file) into the body of `model`: ResNet keys map onto
    model.backbone.body (fc.* skipped), Swin's features.* onto model.backbone.features (norm, head skipped).
    Strict on the body; returns a one-line description, raises a one-line ValueError otherwise."""
    sd, where = read_weights(source)
    if isinstance(model.backbone, SwinFPN):
        body = model.backbone.features
        sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith(("norm.", "head."))}
    else:
        body = model.backbone.body
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    name = getattr(model, "spec_name", "the model")
    sd, _ = _check(f"backbone weights {where} do not fit the body of {name}", body.state_dict(), sd)
    body.load_state_dict(sd)
    return f"loaded {len(sd)} backbone tensors from {where}"


if __name__ == "__main__":  # python models.py: the zoo, with parameter counts
    for n in ZOO:
        same = f"= torchvision {TORCHVISION[n]}" if n in TORCHVISION else ""
        print(f"{n:20s} {count_params(build_detector(n, 91)) / 1e6:7.1f} M  {same}")
