"""Tests of the model zoo (models.py): torchvision parity, heterogeneous teacher/student pairs, weights.

CPU only, no network. Models at torchvision's widths are built on the meta device (shapes, no memory) where
only their structure is checked. Run: python -m pytest -q test_zoo.py
"""
import contextlib
import copy
import io
import os
import pickle
import urllib.error
from collections import OrderedDict

import pytest
import torch
import torchvision
from pycocotools.coco import COCO
from torch import nn
from torchvision.models import get_weight
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou, clip_boxes_to_image

import data
import engine
import mtpd
import train
from conftest import cli, tiny_batch
from conftest import tiny_detector as tiny
from models import (TORCHVISION, ZOO, Float32Anchors, FrozenBN, build_detector, float32_outputs, fpn_features,
                    inherit, load_backbone_weights, load_weights)

NOT_MODULE = set(vars(nn.Module()))
PLAIN = (bool, int, float, str, tuple, type(None))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many tiny ops: one thread is ~10x faster than two on a busy 2-core machine, where
    every OpenMP barrier waits for the descheduled thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def settings(model):
    """Every plain attribute of every submodule: the hyperparameters a builder sets (anchor sizes, RPN and
    RoI counts, loss types, transform sizes, conv strides, norm eps...)."""
    out = {}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if k not in NOT_MODULE and k != "spec_name" and (
                    isinstance(v, PLAIN)
                    or isinstance(v, dict) and all(isinstance(x, PLAIN) for x in v.values())):
                out[f"{name}.{k}"] = v
    return out


def hub_path(monkeypatch, tmp_path, name):
    """An empty torch hub cache under tmp_path, no network; the path where weights `name` are cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *a, **k):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(get_weight(name).url))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


# ---------------------------------------------------------------------------------------------------------
# The exact torchvision names
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours", list(TORCHVISION))
def test_exact_names_are_torchvisions_builders(ours):
    with torch.device("meta"):
        a = build_detector(ours, 91)
        b = getattr(torchvision.models.detection, TORCHVISION[ours])(weights=None, weights_backbone=None)
        frozen = build_detector(ours, 91, pretrained=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)
    assert settings(a) == settings(b)  # same hyperparameters everywhere, anchors included
    assert all(p.requires_grad for p in a.parameters())  # from scratch: everything trains, as torchvision's
    assert list(frozen.state_dict()) == list(sa)  # same keys when built for finetuning


@pytest.mark.parametrize("ours", ["retinanet_r50", "fcos_r50", "fasterrcnn_r50_v2"])
def test_pretrained_build_is_torchvisions_recipe(ours, monkeypatch, tmp_path):
    """torchvision given ImageNet weights: FrozenBatchNorm2d in the body (v1) and conv1/layer1 frozen."""
    path = hub_path(monkeypatch, tmp_path, "ResNet50_Weights.IMAGENET1K_V1")
    with torch.device("meta"):
        torch.save(torchvision.models.resnet50().state_dict(), path)  # a stand-in file in the hub cache
        a = build_detector(ours, 91, pretrained=True)
        b = getattr(torchvision.models.detection, TORCHVISION[ours])(
            weights_backbone=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    assert [(n, p.requires_grad) for n, p in a.named_parameters()] == [
        (n, p.requires_grad) for n, p in b.named_parameters()]
    frozen = [isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in a.modules()]
    assert frozen == [isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in b.modules()]
    assert any(frozen) == (not ours.endswith("_v2"))  # torchvision's v2 keeps BatchNorm2d


def test_small_image_settings_apply_to_exact_names():
    with torch.device("meta"):
        retina = build_detector("retinanet_r50_v2", 5, scale=0.5, min_size=128, max_size=128, anchor_base=16)
        fcos = build_detector("fcos_r50", 5, scale=0.5, min_size=128, max_size=128, anchor_base=16)
        faster = build_detector("fasterrcnn_r50", 5, min_size=128, max_size=128, anchor_base=16)
    assert retina.transform.min_size == (64,) and retina.transform.max_size == 64
    assert retina.anchor_generator.sizes[0] == (8, 10, 12) and retina.anchor_generator.sizes[-1][0] == 128
    assert fcos.anchor_generator.sizes == ((2.0,), (4.0,), (8.0,), (16.0,), (32.0,))  # one per level
    assert fcos.center_sampling_radius * fcos.anchor_generator.sizes[0][0] == 1.5 * 8  # 1.5 strides
    assert (faster.rpn.anchor_generator.sizes[0] == (16,)
            and faster.roi_heads.fg_bg_sampler.batch_size_per_image == 64)
    assert faster.rpn._pre_nms_top_n == dict(training=600, testing=300)  # CPU-friendly at small sizes
    assert retina.head.regression_head._loss_type == "giou"


@pytest.mark.parametrize("name", ZOO)
def test_every_model_gives_stride_keyed_features(name):
    with torch.device("meta"):
        model = build_detector(name, 8, min_size=64, max_size=64)
        x = torch.empty(1, 3, 64, 64)
        feats = mtpd.stride_keyed(x.shape[-2:], model.backbone(x))
    two_stage = name.startswith(("fasterrcnn", "maskrcnn"))
    assert sorted(feats) == ([4, 8, 16, 32, 64] if two_stage else [8, 16, 32, 64, 128])
    assert feats[8].shape == (1, 256, 8, 8)
    anchors = model.rpn.anchor_generator if two_stage else model.anchor_generator
    assert isinstance(anchors, Float32Anchors) and len(anchors.sizes) == len(feats)  # one size set per level


# ---------------------------------------------------------------------------------------------------------
# Heterogeneous pairs (§3.1, §4): levels paired by stride, the right adapter, one distillation step
# ---------------------------------------------------------------------------------------------------------
R, ALL = [8, 16, 32, 64], [8, 16, 32, 64, 128]


def adapter_kind(adapter, fs, ft):
    """Which of the paper's four cases (§3.1) an adapter built for one level pair is: a 1x1 conv or not
    (mtpd.Adapter.proj), a resize or not (the maps' sizes differ)."""
    conv, resize = isinstance(adapter.proj, torch.nn.Conv2d), fs.shape[-2:] != ft.shape[-2:]
    return {(False, False): "identity", (True, False): "conv", (False, True): "upsample",
            (True, True): "conv+upsample"}[(conv, resize)]


def distil_step(student, teacher, images, strides, kind):
    """One step of §3.1 on the feature loss alone: levels paired by stride, one fresh adapter per level
    (mtpd.make_adapters, which leaves the student's mode and BatchNorm statistics alone). Checks the
    adapter kinds, that the student's backbone trains and that the teacher stays as it was."""
    student.train().zero_grad(set_to_none=True)
    mtpd.freeze(teacher).zero_grad(set_to_none=True)  # a teacher may have been a student before
    buffers = {k: v.clone() for k, v in student.named_buffers()}
    adapters = mtpd.make_adapters(student, teacher, images, fpn_features)
    assert student.training and all(torch.equal(v, buffers[k]) for k, v in student.named_buffers())
    assert sorted(map(int, adapters)) == strides
    with torch.no_grad():  # there is no backpropagation through the teacher
        ft = fpn_features(teacher, images)
    fs = fpn_features(student, images)
    kinds = {s: adapter_kind(adapters[str(s)], fs[s], ft[s]) for s in strides}
    assert kinds[strides[0]] == kind
    if "upsample" not in kind:  # at tiny sizes the coarsest levels of two resolutions can both be 1x1
        assert set(kinds.values()) == {kind}
    before_s = {n: p.detach().clone() for n, p in student.named_parameters()}
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = mtpd.feature_loss(fs, ft, adapters)
    assert torch.isfinite(loss) and loss > 0
    opt = torch.optim.SGD(list(student.parameters()) + list(adapters.parameters()), lr=0.1)
    loss.backward()
    opt.step()
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, before_s[n])]
    assert any(n.startswith("backbone.") for n in changed) and all(n.startswith("backbone.") for n in changed)
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


PAIRS = {  # id: student, teacher (name, build kwargs), common strides, adapter kind
    "retinanet<-fasterrcnn": (("retinanet_r18", {}), ("fasterrcnn_r18", {}), R, "identity"),
    "retinanet<-maskrcnn": (("retinanet_r18", {}), ("maskrcnn_r18", {}), R, "identity"),
    "r18<-r50": (("maskrcnn_r18", {}), ("maskrcnn_r50", {}), [4] + R, "identity"),
    "retinanet<-fcos": (("retinanet_r18", {}), ("fcos_r18", {}), ALL, "identity"),
    "cnn<-swin": (("retinanet_r18", {}), ("retinanet_swin_t", {}), ALL, "identity"),
    "swin<-cnn": (("retinanet_swin_t", {}), ("retinanet_r18", {}), ALL, "identity"),
    "fpn16<-fpn32": (("retinanet_r18", {}), ("retinanet_r18", dict(fpn_channels=32)), ALL, "conv"),
    "fpn16,x0.5<-fpn32": (("retinanet_r18", dict(scale=0.5)), ("retinanet_r18", dict(fpn_channels=32)), ALL,
                          "conv+upsample"),
    # torchvision's widths (256-channel FPN, P2-P6) into a 16-channel P3-P7 student
    "retinanet<-fasterrcnn_r50": (("retinanet_r18", {}), ("fasterrcnn_r50", dict(fpn_channels=256)), R,
                                  "conv"),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_heterogeneous_pair_distils(pair):
    (sname, skw), (tname, tkw), strides, kind = PAIRS[pair]
    torch.manual_seed(0)
    distil_step(tiny(sname, **skw), tiny(tname, **tkw), tiny_batch(2, 64)[0], strides, kind)


def test_low_resolution_student_from_higher_resolution_teachers():
    """The paper's 0.25x student with teachers at 0.5x -> 0.75x -> 1x, one stage each (fresh adapters)."""
    torch.manual_seed(0)
    student, images = tiny("retinanet_r18", scale=0.25, size=128), tiny_batch(2, 128)[0]
    for scale in (0.5, 0.75, 1.0):
        distil_step(student, tiny("retinanet_r18", scale=scale, size=128), images, ALL, "upsample")


def test_group_norm_heads_the_gap_presets_pool_and_inherit():
    """head_gn: GroupNorm after each conv of both RetinaNet subnets (torchvision's v2 head). The `gap`
    preset's student pairs with every teacher of its pool at all five strides, its maps upsampled by the
    resolution ratio, and inherits the whole neck and head of a RetinaNet-R18 teacher at any resolution
    (GroupNorm included; the body keeps its own), less of an R50, and only the neck of the FCOS one.
    A teacher of another kind and width (no neck or head tensor of the student's role and shape) is a
    ValueError."""
    p = train.PRESETS["gap"]
    images = tiny_batch(1, p["size"])[0]

    def made(m):  # seeded by label: the student's and the R18 teachers' weights differ
        return engine.build(engine.make_spec(m["label"], m["name"], m["scale"], p["size"], [1, 2, 3, 4, 5],
                                             **m["build"]), sum(map(ord, m["label"]))).eval()

    student = made(p["student"])
    gn = [m for m in student.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gn) == 2 * p["student"]["build"]["head_convs"] and all(m.num_groups == 32 for m in gn)
    with torch.no_grad():
        fs = fpn_features(student, images)
    for m in p["pool"]:
        teacher = made(m)
        with torch.no_grad():
            ft = fpn_features(teacher, images)
        assert sorted(map(int, mtpd.make_adapters(student, teacher, images, fpn_features))) == ALL
        assert ft[8].shape[-1] == fs[8].shape[-1] * m["scale"] / p["student"]["scale"]
        heir = copy.deepcopy(student)
        copied, of = inherit(heir, teacher, images)
        # an R50's lateral 1x1 convs read C3-C5 of other widths: all but their 3 weights; FCOS: the neck only
        neck = sum(k.startswith("backbone.fpn.") for k in student.state_dict())
        expected = {"retinanet_r18": of, "retinanet_r50": of - 3, "fcos_r18": neck}[m["name"]]
        assert copied == expected, (m["label"], copied, of)
        if m["name"] == "retinanet_r18":  # the neck and head are the teacher's, the body the student's own
            own, theirs = student.state_dict(), teacher.state_dict()
            assert not torch.equal(own["head.classification_head.cls_logits.weight"],
                                   theirs["head.classification_head.cls_logits.weight"])
            for k, v in heir.state_dict().items():
                assert torch.equal(v, (own if k.startswith("backbone.body.") else theirs)[k]), k
    with pytest.raises(ValueError, match="nothing to inherit") as e:
        inherit(tiny("retinanet_r18"), tiny("fcos_r18", fpn_channels=32), tiny_batch(1, 64)[0])
    assert one_line(e)


def test_two_stage_teacher_through_distill_losses():
    """The training forward of §3.1 (hooked student features, detection + distillation terms); a student
    in eval mode (detections, not losses) is refused."""
    torch.manual_seed(0)
    student, teacher = tiny("retinanet_r18").train(), mtpd.freeze(tiny("fasterrcnn_r18"))
    images, targets = tiny_batch(2, 64)
    feats, hooks = mtpd.capture_features(student.backbone, student.transform)  # sizes, as fpn_features gives
    adapters = mtpd.make_adapters(student, teacher, images, fpn_features)
    assert sorted(map(int, adapters)) == R
    with pytest.raises(ValueError, match="eval mode"):
        mtpd.distill_losses(student.eval(), images, targets, feats, [teacher], [adapters], fpn_features)
    losses = mtpd.distill_losses(student.train(), images, targets, feats, [teacher], [adapters], fpn_features)
    hooks.remove()
    assert set(losses) == {"classification", "bbox_regression", "distill"} and sorted(feats) == ALL
    assert feats.sizes == [(64, 64)] * 2 and torch.isfinite(losses["distill"]) and losses["distill"] > 0
    sum(losses.values()).backward()
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------------------
# Mixed precision: boxes, scores and masks stay float32 under autocast (models.float32_outputs)
# ---------------------------------------------------------------------------------------------------------
PADDED = (800, 1088)  # an 800x1066 input (a 480x640 COCO image at min_size 800), padded to a multiple of 32


class FixedMaps(nn.Module):
    """A backbone stand-in that returns the same FPN maps whatever the input: at COCO size a bf16 R18
    forward is far too slow on a CPU without bf16 units, and what is tested here runs after the backbone."""

    def __init__(self, maps, out_channels):
        super().__init__()
        self.maps, self.out_channels = maps, out_channels

    def forward(self, x):
        return OrderedDict(self.maps)


def coco_size_model(name, regression=None):
    """A light `name` (3 classes, 16-channel FPN, one conv per head subnet) at COCO's input size (min_size
    800, max_size 1333: the 800x1066 image returned is not resized) on random FPN maps of the real shapes.
    Every candidate is kept (score threshold 0) and the class logits are spread out: at init they are all
    about equal, and bf16's rounding would reorder which candidates make the final 100-300. FCOS's
    regression goes through a ReLU: a bias of 1 keeps its outputs positive (else boxes collapse onto the
    anchor centres, multiples of 8 px).
    regression: a constant for every box-regression output (its weights zeroed, its bias set).
    Returns (model in eval mode, image)."""
    torch.manual_seed(0)
    kw = dict(fpn_channels=16, head_convs=1)
    model = build_detector(name, 4, **kw).eval()
    with torch.device("meta"):
        maps = build_detector(name, 4, **kw).backbone(torch.empty(1, 3, *PADDED))
    model.backbone = FixedMaps(OrderedDict((k, torch.randn(v.shape)) for k, v in maps.items()), 16)
    if hasattr(model, "rpn"):
        model.roi_heads.score_thresh = 0.0
        cls = model.roi_heads.box_predictor.cls_score
        regressions = [model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred]
    else:
        model.score_thresh = 0.0
        cls, regressions = model.head.classification_head.cls_logits, [model.head.regression_head.bbox_reg]
    nn.init.normal_(cls.weight)
    if name.startswith("fcos"):
        nn.init.ones_(regressions[0].bias)
    if regression is not None:
        for layer in regressions:
            nn.init.zeros_(layer.weight)
            nn.init.constant_(layer.bias, regression)
    return model, torch.rand(3, 800, 1066)


def detect(model, image, bf16):
    """model([image]) under bf16 autocast or in float32: (detections, the RPN's proposals or None)."""
    proposals = []
    hook = model.rpn.register_forward_hook(lambda m, args, out: proposals.append(out[0][0])) \
        if hasattr(model, "rpn") else None
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        det = model([image])[0]
    if hook:
        hook.remove()
    return det, proposals[0] if proposals else None


def off_by(boxes, ref, labels=None, ref_labels=None):
    """Per box: its largest coordinate difference (px) to the nearest box of `ref` (of the same label)."""
    d = (boxes[:, None].float() - ref[None]).abs().amax(-1)
    if labels is not None:
        d[labels[:, None] != ref_labels[None]] = float("inf")
    return d.min(1).values


def on_bf16_grid(boxes):
    """Share of the box x-coordinates above 512 px that are multiples of 4 (bf16's spacing up to 1024)."""
    x = boxes[:, 0::2].float()
    x = x[x > 512]
    assert len(x) >= 50
    return (x % 4 == 0).float().mean().item()


@pytest.mark.parametrize("name", ["retinanet_r18", "fcos_r18", "fasterrcnn_r18"])
def test_bf16_boxes_are_the_float32_boxes_at_coco_size(name):
    """torchvision's box coders cast the float32 anchors (RPN proposals) to the dtype of the regression
    output: without float32_outputs the bf16 boxes, final and proposals, sit on bf16's grid (4 px at
    512-1024 px)."""
    model, image = coco_size_model(name)
    ref, ref_proposals = detect(model, image, bf16=False)
    det, proposals = detect(model, image, bf16=True)
    assert det["boxes"].dtype == det["scores"].dtype == torch.float32 and len(det["boxes"]) >= 100
    # the same detections to within 1 px (bf16 heads give slightly other scores and regression outputs)
    assert (off_by(det["boxes"], ref["boxes"], det["labels"], ref["labels"]) <= 1).float().mean() >= 0.9
    assert on_bf16_grid(det["boxes"]) < 0.1
    if proposals is not None:
        assert proposals.dtype == torch.float32 and len(proposals) == 1000
        assert (off_by(proposals, ref_proposals) <= 1).float().mean() >= 0.9
        assert on_bf16_grid(proposals) < 0.1


@pytest.mark.parametrize("name", ["retinanet_r18", "fcos_r18", "fasterrcnn_r18"])
def test_bf16_boxes_of_a_constant_regression_are_exact(name):
    """A zero regression makes every box an anchor (RPN proposals and final R-CNN boxes too); FCOS's
    constant 1 makes it the anchor's centre -+ the anchor's size. Those are exact in float32 (integers and
    halves), so every box of a bf16-autocast forward must be one of them exactly."""
    fcos = name.startswith("fcos")
    model, image = coco_size_model(name, regression=1.0 if fcos else 0.0)
    batch, _ = model.transform([image])
    maps = list(model.backbone(batch.tensors).values())
    generator = model.rpn.anchor_generator if hasattr(model, "rpn") else model.anchor_generator
    anchors = generator(batch, maps)[0]
    if fcos:  # torchvision's BoxLinearCoder: centre -+ code * anchor size
        centre, size = (anchors[:, :2] + anchors[:, 2:]) / 2, anchors[:, 2:] - anchors[:, :2]
        anchors = torch.cat([centre - size, centre + size], 1)
    exact = set(map(tuple, clip_boxes_to_image(anchors, batch.image_sizes[0]).tolist()))
    det, proposals = detect(model, image, bf16=True)
    for boxes in [det["boxes"]] + ([proposals] if proposals is not None else []):
        assert len(boxes) >= 100
        inexact = sum(tuple(b) not in exact for b in boxes.tolist())
        assert inexact == 0, f"{inexact} of {len(boxes)} boxes are not exact"


@pytest.mark.parametrize("name", ["retinanet_r18", "fcos_r18", "fasterrcnn_r18", "maskrcnn_r18"])
def test_every_detector_gives_float32_outputs_under_autocast(name):
    """Detections (boxes, scores, masks) are float32 under bf16 and fp16 autocast, and so are the training
    RPN proposals and losses under bf16 (tiny sizes: only the dtypes are checked); the hooks survive
    deepcopy and pickling."""
    torch.manual_seed(0)
    model = tiny(name, num_classes=3)
    two_stage = hasattr(model, "rpn")
    (model.roi_heads if two_stage else model).score_thresh = 0.0  # detections from a fresh model
    if two_stage:  # few RoIs: the 256-channel mask head is slow in bf16 on this CPU
        model.roi_heads.detections_per_img, model.roi_heads.fg_bg_sampler.batch_size_per_image = 2, 8
    images, targets = tiny_batch(2, 64)  # not 1: FCOS's GroupNorm (one channel a group) refuses a 1x1 P7
    for t in targets:
        t["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
        t["masks"][0, 4:24, 4:20] = 1
    for low in (torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast("cpu", low):
            det = model.eval()(images)[0]
        assert len(det["boxes"]) and ("masks" in det) == name.startswith("maskrcnn")
        assert {k: v.dtype for k, v in det.items() if v.is_floating_point()} == dict.fromkeys(
            ["boxes", "scores"] + (["masks"] if "masks" in det else []), torch.float32)
    if two_stage:  # training proposals: the RoI heads match and encode the ground truth in their dtype
        proposals = []
        hook = model.rpn.register_forward_hook(lambda m, args, out: proposals.append(out[0][0]))
    with torch.autocast("cpu", torch.bfloat16):
        losses = model.train()(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    if two_stage:
        hook.remove()
        assert proposals[0].dtype == torch.float32
    hooked = {"retinanet": 1, "fcos": 1, "fasterrcnn": 2, "maskrcnn": 3}[name.partition("_")[0]]
    for clone in (model, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert sum(float32_outputs in m._forward_hooks.values() for m in clone.modules()) == hooked


def test_float32_outputs_casts_only_half_precision():
    bf16, fp16, fp32, fp64, ints = (torch.ones(2, dtype=t) for t in (
        torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.long))
    out = float32_outputs(None, (), ({"a": [bf16, fp16]}, [fp32, fp64, ints]))
    assert isinstance(out, tuple) and [t.dtype for t in out[0]["a"]] == [torch.float32] * 2
    assert all(a is b for a, b in zip(out[1], [fp32, fp64, ints]))


def coco_like_gt(n_images=30, per_image=8):
    """An in-memory pycocotools COCO of 640x480 images with COCO's mix of object sizes: 41% small, 34%
    medium, 25% large (sqrt(area) log-uniform in 8-32, 32-96, 96-320 px; aspect ratios 1:2 to 2:1).
    Returns (coco, boxes [n_images * per_image, 4] xyxy, their image ids)."""
    g = torch.Generator().manual_seed(0)
    n = n_images * per_image
    bucket = torch.multinomial(torch.tensor([0.41, 0.34, 0.25]), n, replacement=True, generator=g)
    lo, hi = torch.tensor([8.0, 32, 96])[bucket], torch.tensor([32.0, 96, 320])[bucket]
    side = lo * (hi / lo) ** torch.rand(n, generator=g)
    ratio = 2 ** (2 * torch.rand(n, generator=g) - 1)  # h / w
    w, h = side / ratio.sqrt(), side * ratio.sqrt()
    x, y = (640 - w) * torch.rand(n, generator=g), (480 - h) * torch.rand(n, generator=g)
    image_ids = [i // per_image + 1 for i in range(n)]
    anns = [{"id": i + 1, "image_id": image_ids[i], "category_id": 1, "bbox": [a, b, c, d], "area": c * d,
             "iscrowd": 0} for i, (a, b, c, d) in enumerate(torch.stack([x, y, w, h], 1).tolist())]
    coco = COCO()
    coco.dataset = {"images": [{"id": i + 1, "file_name": f"{i}.jpg", "height": 480, "width": 640}
                               for i in range(n_images)],
                    "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco, torch.stack([x, y, x + w, y + h], 1), image_ids


def test_bf16_box_decoding_cost_coco_ap():
    """What decoding in bf16 cost: ground-truth boxes encoded against a RetinaNet's anchors at 800x1066,
    the codes rounded to bf16 (the head's output), decoded and scaled back to 640x480 the old way (anchors,
    decoding and transform.postprocess in bf16) and the float32 way, then scored as detections."""
    coco, gt, image_ids = coco_like_gt()
    model, image = coco_size_model("retinanet_r18")
    batch, _ = model.transform([image])
    anchors = model.anchor_generator(batch, list(model.backbone(batch.tensors).values()))[0]
    gt_in = resize_boxes(gt, [480, 640], batch.image_sizes[0])  # as the transform resizes targets
    best = torch.cat([box_iou(chunk, anchors).argmax(1) for chunk in gt_in.split(50)])
    codes = model.box_coder.encode_single(gt_in, anchors[best]).bfloat16()
    scores = torch.rand(len(gt), generator=torch.Generator().manual_seed(1)).tolist()
    ap = {}
    for way, c in (("bf16", codes), ("float32", float32_outputs(model.head, (), codes))):
        boxes = model.box_coder.decode_single(c, anchors[best])  # bf16 codes: the anchors are cast to bf16
        boxes = resize_boxes(boxes, batch.image_sizes[0], [480, 640]).float()
        boxes[:, 2:] -= boxes[:, :2]  # xywh, as data.predict
        results = [{"image_id": i, "category_id": 1, "bbox": b, "score": s}
                   for i, b, s in zip(image_ids, boxes.tolist(), scores)]
        ap[way] = data.score(coco, results)
    ap = {way: {k: round(s[k], 3) for k in ("AP", "APs", "AP75", "APl")} for way, s in ap.items()}
    assert ap["float32"]["AP"] >= 0.999 and ap["float32"]["APs"] >= 0.999, ap
    assert ap["bf16"]["AP"] < 0.9 and ap["bf16"]["APs"] < 0.8, ap


# ---------------------------------------------------------------------------------------------------------
# Finetuning builds: FrozenBatchNorm2d with BatchNorm2d's keys, conv1/layer1 frozen
# ---------------------------------------------------------------------------------------------------------
def test_frozen_build_trains_like_torchvision_and_loads_both_ways(tmp_path):
    scratch, frozen = tiny("retinanet_r18"), tiny("retinanet_r18", pretrained=True)
    body = frozen.backbone.body
    assert isinstance(body.bn1, FrozenBN) and not body.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    stats = body.layer2[0].bn1.running_mean.clone()
    frozen.train()(*tiny_batch(2, 64))
    assert torch.equal(body.layer2[0].bn1.running_mean, stats)  # frozen statistics in train mode
    # BatchNorm2d -> FrozenBN, strictly
    frozen.load_state_dict(scratch.state_dict())
    # FrozenBatchNorm2d (torchvision) -> BatchNorm2d / FrozenBN, strictly: no num_batches_tracked there
    tv = torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d).state_dict()
    del tv["fc.weight"], tv["fc.bias"]
    scratch.backbone.body.load_state_dict(tv)
    frozen.backbone.body.load_state_dict(tv)
    # a file without num_batches_tracked whose metadata says BatchNorm2d: load_weights fills the counters
    sd = scratch.state_dict()
    for k in [k for k in sd if k.endswith("num_batches_tracked")]:
        del sd[k]
    torch.save(sd, tmp_path / "no_counters.pt")
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        scratch.load_state_dict(torch.load(tmp_path / "no_counters.pt", weights_only=True))
    assert load_weights(scratch, str(tmp_path / "no_counters.pt"), 8).startswith("loaded")


# ---------------------------------------------------------------------------------------------------------
# load_weights / load_backbone_weights (no network: files and a stand-in torch hub cache)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tv_maskrcnn(tmp_path_factory):
    """torchvision's maskrcnn_resnet50_fpn (weights=None) saved as a plain state_dict."""
    path = tmp_path_factory.mktemp("tv") / "maskrcnn.pth"
    torch.manual_seed(1)
    sd = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    torch.save(sd, path)
    return str(path), sd


def test_load_torchvision_weights_file_and_name(tv_maskrcnn, monkeypatch, tmp_path):
    path, sd = tv_maskrcnn
    model = build_detector("maskrcnn_r50", 91, pretrained=True)
    assert load_weights(model, path, 91) == f"loaded {len(sd)} tensors from {path}"
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # the same file as torchvision's COCO weights in the torch hub cache: loaded by name, no network
    cached = hub_path(monkeypatch, tmp_path, "MaskRCNN_ResNet50_FPN_Weights.COCO_V1")
    os.symlink(path, cached)
    assert cached in load_weights(model, "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", 91)
    assert model.backbone.body.bn1.eps == 0.0  # torchvision trained these weights with eps 0


def test_other_number_of_classes_keeps_all_but_the_class_layers(tv_maskrcnn):
    path, sd = tv_maskrcnn
    torch.manual_seed(0)
    model = build_detector("maskrcnn_r50", 5, min_size=64, max_size=64)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if v.shape != sd[k].shape}
    assert list(fresh) == [f"roi_heads.{layer}.{p}" for layer in ("box_predictor.cls_score",
                                                                  "box_predictor.bbox_pred",
                                                                  "mask_predictor.mask_fcn_logits")
                           for p in ("weight", "bias")]
    assert load_weights(model, path, 5) == (f"kept {len(sd) - 6} tensors from {path}; fresh for 5 classes: "
                                            + ", ".join(fresh))
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k] if k in fresh else sd[k]), k


def test_retinanet_classes_and_mtpd_checkpoints(tmp_path):
    """An mtpd checkpoint (engine.save_ckpt: {model, spec, metrics}) loads as weights; with another number
    of classes everything but the classification logits."""
    spec = engine.make_spec("s", "retinanet_r18", 1.0, 64, range(1, 8), fpn_channels=16, head_convs=1)
    src = engine.build(spec, 0)
    engine.save_ckpt(str(tmp_path / "ckpt.pt"), src, spec, {"AP": 0.1})
    same = tiny("retinanet_r18", num_classes=8)
    assert load_weights(same, str(tmp_path / "ckpt.pt"), 8) == \
        f"loaded {len(src.state_dict())} tensors from {tmp_path / 'ckpt.pt'}"
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in same.state_dict().items())
    other = tiny("retinanet_r18", num_classes=4)
    logits = other.head.classification_head.cls_logits.weight.clone()
    msg = load_weights(other, str(tmp_path / "ckpt.pt"), 4)
    assert msg.endswith("fresh for 4 classes: head.classification_head.cls_logits.weight, "
                        "head.classification_head.cls_logits.bias")
    assert torch.equal(other.head.regression_head.bbox_reg.weight, src.head.regression_head.bbox_reg.weight)
    assert torch.equal(other.head.classification_head.cls_logits.weight, logits)


@pytest.mark.parametrize("name", ["retinanet_r18", "fasterrcnn_r18"])
def test_coco_class_layers_cut_to_the_dataset_categories(name, tmp_path):
    """torchvision's COCO weights index classes by category id (91); our labels are 1..K in the order of
    category_ids: the kept rows make the model score our labels as the COCO model scores those ids. A model
    whose number of classes is not len(category_ids) + 1 is a one-line ValueError."""
    torch.manual_seed(0)
    coco, ids = tiny(name, num_classes=91), [3, 17, 90]
    torch.save(coco.state_dict(), tmp_path / "coco.pt")
    ours = tiny(name, num_classes=4)
    msg = load_weights(ours, str(tmp_path / "coco.pt"), 4, category_ids=ids)
    assert msg.endswith("class layers cut to background + 3 category ids")
    rows = [0] + ids
    with torch.no_grad():
        if name.startswith("retinanet"):
            x = torch.randn(1, 16, 4, 4)
            a = coco.head.classification_head.cls_logits(x).view(1, 9, 91, 4, 4)[:, :, rows]
            b = ours.head.classification_head.cls_logits(x).view(1, 9, 4, 4, 4)
            assert torch.equal(a, b)
        else:
            x = torch.randn(5, 1024)
            (sa, da), (sb, db) = coco.roi_heads.box_predictor(x), ours.roi_heads.box_predictor(x)
            # allclose: a GEMM with 4 rows need not sum in the order of one with 91
            assert torch.allclose(sa[:, rows], sb, atol=1e-6)
            assert torch.allclose(da.view(5, 91, 4)[:, rows], db.view(5, 4, 4), atol=1e-6)
    with pytest.raises(ValueError, match="category ids") as e:
        load_weights(tiny(name, num_classes=5), str(tmp_path / "coco.pt"), 5, category_ids=ids)
    assert one_line(e)


def test_bad_weights_are_one_line_errors(monkeypatch, tmp_path):
    """Missing, unexpected and other-shaped tensors, no such file or name, an unreadable file, a file of
    something else, and torchvision's weights not in the hub cache without network (say where to put
    them): one-line ValueErrors."""
    model = tiny("retinanet_r18")
    sd = model.state_dict()
    sd["backbone.fpn.renamed.weight"] = sd.pop("backbone.fpn.inner_blocks.0.0.weight")
    torch.save(sd, tmp_path / "renamed.pt")
    torch.save(tiny("retinanet_r18", fpn_channels=32).state_dict(), tmp_path / "wide.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    for file, match in [
            ("renamed.pt", r"1 missing \(backbone.fpn.inner_blocks.0.0.weight\); "
                           r"1 unexpected \(backbone.fpn.renamed.weight\)"),
            ("wide.pt", r"of other shape \(backbone.fpn.inner_blocks.0.0.weight \[32, 128, 1, 1\] vs "
                        r"\[16, 128, 1, 1\]"),
            ("absent.pt", "no such file, and not a torchvision weights name"),
            ("broken.pt", "cannot read weights"), ("list.pt", "holds a list, not a state_dict")]:
        with pytest.raises(ValueError, match=match) as e:
            load_weights(model, str(tmp_path / file), 8)
        assert one_line(e)
    path = hub_path(monkeypatch, tmp_path, "RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    with pytest.raises(ValueError, match="cannot download RetinaNet_ResNet50_FPN_Weights.COCO_V1") as e:
        load_weights(model, "RetinaNet_ResNet50_FPN_Weights.COCO_V1", 91)
    assert one_line(e) and str(e.value).endswith(
        f"put {get_weight('RetinaNet_ResNet50_FPN_Weights.COCO_V1').url} at {path}")
    assert not os.path.exists(path)


def test_backbone_weights_by_name_and_from_a_file(monkeypatch, tmp_path):
    """ImageNet weights by name from the hub cache into a ResNet body (fc skipped; the neck and head keep
    theirs), a Swin's from a file (norm and head skipped); a body of another depth is a one-line error."""
    path = hub_path(monkeypatch, tmp_path, "ResNet18_Weights.IMAGENET1K_V1")
    torch.manual_seed(2)
    imagenet = torchvision.models.resnet18().state_dict()
    torch.save(imagenet, path)
    model = tiny("retinanet_r18")
    head = model.head.state_dict()
    assert load_backbone_weights(model, "ResNet18_Weights.IMAGENET1K_V1") == \
        f"loaded {len(imagenet) - 2} backbone tensors from {path}"
    assert all(torch.equal(v, imagenet[k]) for k, v in model.backbone.body.state_dict().items())
    assert all(torch.equal(v, head[k]) for k, v in model.head.state_dict().items())
    with pytest.raises(ValueError, match=r"missing \(layer1.2.conv1.weight") as e:  # an R18 body into an R34
        load_backbone_weights(tiny("retinanet_r34"), "ResNet18_Weights.IMAGENET1K_V1")
    assert one_line(e)
    swin = tiny("retinanet_swin_t")
    feats = {f"features.{k}": v + 1 for k, v in swin.backbone.features.state_dict().items()}
    torch.save({**feats, "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
                "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000)}, tmp_path / "swin.pth")
    assert load_backbone_weights(swin, str(tmp_path / "swin.pth")) == \
        f"loaded {len(feats)} backbone tensors from {tmp_path / 'swin.pth'}"
    assert all(torch.equal(v, feats[f"features.{k}"]) for k, v in swin.backbone.features.state_dict().items())


def test_train_cli_loads_weights_files_and_reports_mismatches(shapes, tmp_path, capsys):
    """`train --weights FILE --epochs 0` imports weights into an mtpd checkpoint (the COCO recipe's first
    step); other classes keep everything but the class layers; a file of another model is one line on
    stderr, exit code 2, and nothing written."""
    root, _ = shapes
    k = len(data.CocoDetection(root, "val", masks=False).category_ids) + 1
    torch.manual_seed(0)
    src, other = build_detector("retinanet_r18", k), build_detector("retinanet_r18", k + 3)
    torch.save(src.state_dict(), tmp_path / "same.pt")
    torch.save(other.state_dict(), tmp_path / "other.pt")
    common = ["train", "--model", "retinanet_r18", "--data", root, "--min-size", "64", "--epochs", "0",
              "--batch", "4", "--precision", "fp32"]
    train.main([*common, "--weights", tmp_path / "same.pt", "--out", tmp_path / "a"])
    got = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    assert got["spec"]["pretrained"] and got["spec"]["num_classes"] == k and 0 <= got["metrics"]["AP"] <= 1
    assert list(got["model"]) == list(src.state_dict())
    assert all(torch.equal(v, got["model"][n]) for n, v in src.state_dict().items())
    capsys.readouterr()
    train.main([*common, "--weights", tmp_path / "other.pt", "--out", tmp_path / "b"])
    assert (f"fresh for {k} classes: head.classification_head.cls_logits.weight, "
            "head.classification_head.cls_logits.bias") in capsys.readouterr().out
    got = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["model"]
    assert got["head.classification_head.cls_logits.weight"].shape[0] == 9 * k
    assert torch.equal(got["head.regression_head.bbox_reg.weight"],
                       other.head.regression_head.bbox_reg.weight)
    code, err = cli(capsys, *common[:2], "retinanet_r34", *common[3:], "--weights", tmp_path / "same.pt",
                    "--out", tmp_path / "c")
    assert code == 2 and err.startswith("error: weights ") and err.count("\n") == 1 and "missing" in err
    assert not (tmp_path / "c").exists()
