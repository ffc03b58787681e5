"""torchvision's RetinaNet, FCOS, Faster and Mask R-CNN on ResNet, ResNeXt and Swin, with a free FPN width,
head depth, input size and anchors: plain torchvision detectors. The names in TORCHVISION build as its
builders (the same state_dict: its COCO weights load); from scratch every BatchNorm trains, pretrained builds
as torchvision does for weights. Under autocast the anchors, P6/P7, boxes and scores stay float32."""
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

NARROW, WIDE, SWIN = [64, 128, 256, 512], [256, 512, 1024, 2048], [96, 192, 384, 768]  # C2..C5 widths
BODIES = {"r18": (resnet.resnet18, NARROW), "r34": (resnet.resnet34, NARROW), "r50": (resnet.resnet50, WIDE),
          "r101": (resnet.resnet101, WIDE), "x101": (resnet.resnext101_32x8d, WIDE),
          "swin_t": (swin_transformer.swin_t, SWIN), "swin_s": (swin_transformer.swin_s, SWIN)}
TORCHVISION = {  # ours -> torchvision's builder, at the default widths (256-channel FPN, 4 head convs)
    "retinanet_r50": "retinanet_resnet50_fpn", "retinanet_r50_v2": "retinanet_resnet50_fpn_v2",
    "fcos_r50": "fcos_resnet50_fpn", "fasterrcnn_r50": "fasterrcnn_resnet50_fpn",
    "fasterrcnn_r50_v2": "fasterrcnn_resnet50_fpn_v2", "maskrcnn_r50": "maskrcnn_resnet50_fpn",
    "maskrcnn_r50_v2": "maskrcnn_resnet50_fpn_v2",
}
ZOO = [f"{kind}_{body}" for kind in ("retinanet", "fcos", "fasterrcnn", "maskrcnn") for body in BODIES] + [
    k for k in TORCHVISION if k.endswith("_v2")]
# torchvision trained these with FrozenBatchNorm2d eps 0, and sets it when loading them
EPS0 = {"RetinaNet_ResNet50_FPN_Weights.COCO_V1", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
        "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"}
CLASS_LAYERS = re.compile(r"(cls_logits|cls_score|bbox_pred|mask_fcn_logits)\.")  # shapes depend on K
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device, precision):
    """The autocast of a precision ('fp32': none), for training, evaluation and the teachers."""
    device = torch.device(device)
    return torch.autocast(device.type, DTYPES[precision], enabled=precision != "fp32")


def _float32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    if isinstance(x, dict):
        return {k: _float32(v) for k, v in x.items()}
    return type(x)(_float32(v) for v in x) if isinstance(x, (list, tuple)) else x


def float32_outputs(module, args, output):
    """A hook: the outputs decoded into boxes, scores, masks in float32 (torchvision's box coders cast the
    anchors to their dtype: under bf16 the boxes would sit on a 4-px grid at 512-1024 px)."""
    return _float32(output)


class Float32Anchors(AnchorGenerator):
    """Anchors in float32 under autocast (torchvision takes the maps' dtype: bf16 is ~1 px off at 256 px)."""

    def forward(self, image_list, feature_maps):
        return super().forward(image_list, [f.new_empty((1, 1, *f.shape[-2:]), dtype=torch.float32)
                                            for f in feature_maps])


class Float32P6P7(LastLevelP6P7):
    """P6/P7 in float32 under autocast: oneDNN's bf16 backward gave NaN gradients on their 1x1 maps."""

    def forward(self, p, c, names):
        device = p[-1].device.type
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return super().forward(p, c, names)
        with torch.autocast(device, enabled=False):
            return super().forward(p[:-1] + [p[-1].float()], c[:-1] + [c[-1].float()], names)


class FrozenBN(FrozenBatchNorm2d):
    """FrozenBatchNorm2d with num_batches_tracked: one state_dict, built for weights or from scratch."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__(num_features, eps)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked.clone())
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args)


class SwinFPN(nn.Module):
    """Swin's stages (NHWC) -> an FPN: x [N, 3, H, W] -> OrderedDict of [N, C, h, w], stage i at 2^(i+1)."""

    def __init__(self, swin, channels, stages, out_channels, extra_blocks):
        super().__init__()
        self.features, self.stages, self.out_channels = swin.features, stages, out_channels
        self.fpn = FeaturePyramidNetwork([channels[s - 1] for s in stages], out_channels, extra_blocks)

    def forward(self, x):
        feats = OrderedDict()
        for i, layer in enumerate(self.features):  # [patch embed, stage 1, merge, stage 2, ...]
            x = layer(x)
            if i % 2 == 1 and (i + 1) // 2 in self.stages:
                feats[str(len(feats))] = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        return self.fpn(feats)


def _backbone(body, width, stages, extra, zero_init_residual, pretrained, v2, two_stage):
    make, channels = BODIES[body]
    if body.startswith("swin"):
        return SwinFPN(make(weights=None), channels, stages, width, extra)
    frozen = partial(FrozenBN, eps=0.0 if pretrained in EPS0 else 1e-5)  # pretrained: True or the weights
    net = make(weights=None, norm_layer=frozen if pretrained and not v2 else nn.BatchNorm2d,
               zero_init_residual=zero_init_residual)
    if pretrained:  # torchvision's trainable_layers=3
        for n, p in net.named_parameters():
            p.requires_grad_(n.startswith(("layer2", "layer3", "layer4")))
    return BackboneWithFPN(net, {f"layer{s}": str(i) for i, s in enumerate(stages)},
                           [channels[s - 1] for s in stages], width, extra_blocks=extra,
                           norm_layer=nn.BatchNorm2d if v2 and two_stage else None)


def build_detector(name, num_classes, scale=1.0, min_size=800, max_size=1333, fpn_channels=256, head_convs=4,
                   anchor_base=32, zero_init_residual=False, pretrained=False, head_gn=False):
    """A detector of the zoo, fresh. name: '<retinanet|fcos|fasterrcnn|maskrcnn>_<body>[_v2]'; num_classes:
    K + 1 (background); scale: the input resolution factor; anchor_base: the finest anchor in original
    pixels, doubling per level; head_gn: GroupNorm in RetinaNet's head; zero_init_residual: for an R50."""
    if name not in ZOO:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(ZOO)}")
    kind, body = name.split("_", 1)
    v2, body = body.endswith("_v2"), body.removesuffix("_v2")
    two_stage = kind in ("fasterrcnn", "maskrcnn")
    if two_stage:  # C2-C5 -> P2-P5 and a max-pooled P6
        stages, extra = [1, 2, 3, 4], LastLevelMaxPool()
    else:  # C3-C5 -> P3-P7; P6 from P5, or from C5 (RetinaNet v2)
        stages, extra = [2, 3, 4], Float32P6P7(BODIES[body][1][-1] if v2 else fpn_channels, fpn_channels)
    backbone = _backbone(body, fpn_channels, stages, extra, zero_init_residual, pretrained, v2, two_stage)
    sizes = [int(anchor_base * scale * 2 ** i) for i in range(5)]
    gn = partial(nn.GroupNorm, math.gcd(32, fpn_channels))  # torchvision's 32 groups, fewer if narrower
    kw = dict(min_size=round(min_size * scale), max_size=round(max_size * scale))
    if kind == "retinanet":
        kw["anchor_generator"] = Float32Anchors(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3)))
                                                      for s in sizes), ((0.5, 1.0, 2.0),) * 5)
        head = RetinaNetHead(fpn_channels, 9, num_classes,
                             norm_layer=gn if v2 or head_gn else None)
        for sub in (head.classification_head, head.regression_head):
            sub.conv = sub.conv[:head_convs]  # a lighter head: it dominates the step on small images
        if v2:
            head.regression_head._loss_type = "giou"
        model = RetinaNet(backbone, num_classes, head=head, **kw)
    elif kind == "fcos":  # one anchor per location; the centre-sampling radius stays 1.5 strides
        r = anchor_base * scale / 32
        kw["anchor_generator"] = Float32Anchors(tuple((8 * r * 2 ** i,) for i in range(5)), ((1.0,),) * 5)
        head = FCOSHead(fpn_channels, 1, num_classes, num_convs=0)
        head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, head_convs,
                                                          norm_layer=gn)
        head.regression_head = FCOSRegressionHead(fpn_channels, 1, head_convs, norm_layer=gn)
        model = FCOS(backbone, num_classes, head=head, center_sampling_radius=1.5 / r, **kw)
    else:  # fewer proposals and RoIs below COCO's sizes: the defaults make a CPU step ~15x a RetinaNet's
        kw["rpn_anchor_generator"] = Float32Anchors(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)
        if min_size < 800:
            kw.update(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                      rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)
        if v2:  # torchvision's v2: a 2-conv RPN, 4-conv box and mask heads with BatchNorm
            kw.update(rpn_head=RPNHead(fpn_channels, 3, conv_depth=2),
                      box_head=FastRCNNConvFCHead((fpn_channels, 7, 7), [256] * 4, [1024], nn.BatchNorm2d))
            if kind == "maskrcnn":
                kw["mask_head"] = MaskRCNNHeads(fpn_channels, [256] * 4, 1, nn.BatchNorm2d)
        model = (MaskRCNN if kind == "maskrcnn" else FasterRCNN)(backbone, num_classes, **kw)
    decoded = ([model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor] if two_stage
               else [model.head])
    for m in decoded:
        if m is not None:
            m.register_forward_hook(float32_outputs)
    model.spec_name = name
    return model


def fpn_features(model, images):
    """The neck's outputs (mtpd.Levels, with the sizes before padding) at the model's own input size."""
    batch, _ = model.transform(images)
    return stride_keyed(batch.tensors.shape[-2:], model.backbone(batch.tensors), batch.image_sizes)


FPN_BLOCK = re.compile(r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(.*)")


def _roles(model, strides):
    """state_dict key -> its role: FPN blocks by their level's stride, the rest by name (heads per type)."""
    roles = {}
    for key in model.state_dict():
        m = FPN_BLOCK.fullmatch(key)
        if m:
            roles[key] = (m[1], strides[int(m[2])], m[3])
        elif key.startswith(("backbone.fpn.", "head.", "rpn.", "roi_heads.")):
            roles[key] = ("fpn" if key.startswith("backbone.") else type(model).__name__, key)
    return roles


@torch.no_grad()
def inherit(student, teacher, images):
    """Inheriting (the authors' code, FGD's, MGD's): copy the teacher's neck and head tensors into the
    student wherever they play the same role with the same shape; the body keeps its own. images: a batch
    to read the strides off. -> (copied, of the student's neck and head tensors)."""
    with eval_mode(student, teacher):
        s_strides, t_strides = (sorted(fpn_features(m, images[:1])) for m in (student, teacher))
    by_role = {role: key for key, role in _roles(teacher, t_strides).items()}
    own, theirs, copied = student.state_dict(), teacher.state_dict(), 0
    roles = _roles(student, s_strides)
    for key, role in roles.items():
        src = by_role.get(role)
        if src is not None and theirs[src].shape == own[key].shape:
            own[key].copy_(theirs[src])  # state_dict tensors share storage with the parameters
            copied += 1
    if not copied:
        raise ValueError(f"nothing to inherit: no neck or head tensor of the {type(teacher).__name__} "
                         f"teacher has the role and shape of one of the {type(student).__name__} student's")
    return copied, len(roles)


# Weights: torchvision's COCO / ImageNet weights by name (torch hub's cache, else downloaded), or a file. --
def read_weights(source):
    """(state_dict, where) of torchvision's weights by name, or of a file (state_dict or mtpd checkpoint)."""
    path = source
    if not os.path.isfile(source):
        try:
            weights = get_weight(source)
        except (ValueError, KeyError):
            raise ValueError(f"weights '{source}': no such file, and not a torchvision weights name (like "
                             "RetinaNet_ResNet50_FPN_Weights.COCO_V1)") from None
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
        if not os.path.isfile(path):
            try:  # torchvision's download into that cache, hash checked
                return weights.get_state_dict(progress=True, check_hash=True, weights_only=True), path
            except Exception as e:
                raise ValueError(f"cannot download {source} ({type(e).__name__}): put {weights.url} at "
                                 f"{path}") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or pickled code that weights_only refuses
        raise ValueError(f"cannot read weights {path}: {str(e).splitlines()[0][:160]}") from None
    sd = sd["model"] if isinstance(sd, dict) and isinstance(sd.get("model"), dict) else sd
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state_dict")
    return sd, path


def _check(what, own, sd, allowed=None):
    """sd with own's num_batches_tracked where it lacks them, and the keys whose shapes differ but match
    `allowed` (left fresh); a one-line ValueError on missing, unexpected or other-shaped keys."""
    sd = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **sd}
    shapes = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    fresh = [k for k in shapes if allowed and allowed.search(k)]
    problems = {"missing": [k for k in own if k not in sd], "unexpected": [k for k in sd if k not in own],
                "of other shape": [f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}"
                                   for k in shapes if k not in fresh]}
    errors = [f"{len(x)} {n} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
              for n, x in problems.items() if x]
    if errors:
        raise ValueError(f"{what}: " + "; ".join(errors))
    return {k: v for k, v in sd.items() if k not in fresh}, fresh


def load_weights(model, source, num_classes, category_ids=None):
    """A detector's weights into `model`, strictly but for the class layers, fresh for another number of
    classes unless `category_ids` (label i <-> category_ids[i - 1]) picks COCO's rows. -> a line."""
    if category_ids is not None and len(category_ids) + 1 != num_classes:
        raise ValueError(f"{len(category_ids)} category ids make {len(category_ids) + 1} classes, "
                         f"not {num_classes}")
    sd, where = read_weights(source)
    sd, own, cut = dict(sd), model.state_dict(), 0
    if category_ids is not None:  # rows are anchor-major (a*K + k) except bbox_pred's (k*4 + j)
        idx = torch.tensor([0, *category_ids])
        for k, v in list(sd.items()):
            if CLASS_LAYERS.search(k) and k in own and v.shape != own[k].shape:
                m = own[k].shape[0] // len(idx)
                n = v.shape[0] // m
                if v.shape[0] % m or n <= idx.max():
                    raise ValueError(f"{k} {list(v.shape)}: not indexed by category ids up to "
                                     f"{int(idx.max())}")
                v = (v.reshape(n, m, *v.shape[1:])[idx] if "bbox_pred" in k
                     else v.reshape(m, n, *v.shape[1:])[:, idx])
                sd[k], cut = v.reshape(own[k].shape), cut + 1
    sd, fresh = _check(f"weights {where} do not fit {getattr(model, 'spec_name', 'the model')}", own, sd,
                       CLASS_LAYERS)
    model.load_state_dict(sd, strict=not fresh)
    if source in EPS0:
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = 0.0
    if fresh:
        return f"kept {len(sd)} tensors from {where}; fresh for {num_classes} classes: {', '.join(fresh)}"
    return f"loaded {len(sd)} tensors from {where}" + (f"; {cut} class layers cut to background + "
                                                       f"{len(category_ids)} category ids" if cut else "")


def load_backbone_weights(model, source):
    """A classifier's ImageNet weights (by name or a file) into the body of `model`, strictly. -> a line."""
    sd, where = read_weights(source)
    if isinstance(model.backbone, SwinFPN):
        body = model.backbone.features
        sd = {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith(("norm.", "head."))}
    else:
        body, sd = model.backbone.body, {k: v for k, v in sd.items() if not k.startswith("fc.")}
    name = getattr(model, "spec_name", "the model")
    sd, _ = _check(f"backbone weights {where} do not fit the body of {name}", body.state_dict(), sd)
    body.load_state_dict(sd)
    return f"loaded {len(sd)} backbone tensors from {where}"
