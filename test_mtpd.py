"""Tests of the method, the models and the data (CPU, tiny tensors and models). Run: python -m pytest -q"""
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import data
import engine
import mtpd
import train
from conftest import run_cli, tiny_batch, tiny_detector
from models import build_detector, fpn_features


# Synthetic maps at two resolutions, without images and so without sizes: the whole-map resize is what
# these tests check, and its once-per-process warning (tested on its own) would only be noise there.
sizeless = pytest.mark.filterwarnings("ignore:mtpd. features without the images' sizes")


def mtpd_warnings(caught):
    """The messages of mtpd's own warnings among those caught."""
    return [str(w.message) for w in caught if str(w.message).startswith("mtpd:")]


# ---------------------------------------------------------------------------------------------------------
# §3.1: feature capture, adapters, feature loss
# ---------------------------------------------------------------------------------------------------------
def test_the_usage_example_at_the_top_of_mtpd_runs_and_distils(monkeypatch):
    """The example in mtpd's docstring, executed as written: BGS orders the two teachers, each stage trains
    the student (its weights move) through upsampling adapters (a 0.5x student), and the hook is gone.
    Every model's features carry the images' sizes, so nothing warns of a padded-map resize."""
    import textwrap
    code = textwrap.dedent(mtpd.__doc__.split("stays true):\n", 1)[1])
    torch.manual_seed(0)
    scope = {}
    monkeypatch.setattr(mtpd, "_warned_padded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "mtpd.__doc__", "exec"), scope)
    assert mtpd_warnings(caught) == [] and not mtpd._warned_padded
    student, order, cost, adapters = scope["student"], scope["order"], scope["cost"], scope["adapters"]
    assert order and set(order) <= {"A", "B"} and order[-1] == "B"  # the best teacher (35 AP) comes last
    assert set(cost) == {"student", "A", "B"} and all(0 <= cost[a][b] for a in cost for b in cost[a])
    assert sorted(adapters) == ["128", "16", "32", "64", "8"]
    assert isinstance(adapters["8"].proj, nn.Identity)  # same widths: identity, then upsampling
    assert not student.backbone._forward_hooks and not student.transform._forward_hooks
    fresh = torchvision_retinanet_state(scope)
    # trained, not just the BatchNorm statistics
    assert any(not torch.equal(fresh[k], v) for k, v in student.named_parameters())


def torchvision_retinanet_state(scope):
    """The student's weights before training: the same constructor under the example's first seed."""
    torch.manual_seed(0)
    return scope["retinanet_resnet50_fpn"](min_size=64, **scope["kw"]).state_dict()


def _stripes(h=480, w=640):
    """A 640x480 test image with horizontal structure, so that a vertical misalignment shows."""
    y = torch.arange(h).float()[:, None].expand(h, w)
    x = torch.arange(w).float()[None, :].expand(h, w)
    return torch.stack([(torch.sin(y / 9) + 1) / 2, (torch.sin(y / 23 + x / 50) + 1) / 2, (y / h) * (x / w)])


@sizeless  # the "before" of line `padded, _ = ...` below
def test_alignment_by_real_extent_on_a_non_square_image():
    """640x480 through a detector's transform at 0.5x (400x533, padded to 416x544) and at 1x (800x1066,
    padded to 800x1088): resizing the padded student map onto the teacher's stretches the content ~4 P3
    cells vertically; aligning by image_sizes puts each image's content cells onto the teacher's. The
    "model" is the transform followed by average pooling at each stride, so that its features are its
    input's content (a random network's features are dominated by the tensor's borders): the same model
    at two scales, aligned, correlates better with itself than the padded resize does (measured: 0.997 vs
    0.747 at P3, 0.962 vs 0.775 at P4)."""
    torch.manual_seed(0)
    kw = dict(min_size=800, max_size=1333, fpn_channels=16, head_convs=1)
    lo, hi = (build_detector("retinanet_r18", 3, scale=sc, **kw) for sc in (0.5, 1.0))

    def features(model):
        batch, _ = model.transform([_stripes()])
        x = batch.tensors
        return mtpd.stride_keyed(x.shape[-2:], [F.avg_pool2d(x, s, ceil_mode=True) for s in (8, 16)],
                                 batch.image_sizes)

    fs, ft = features(lo.eval()), features(hi.eval())
    assert fs.sizes == [(400, 533)] and ft.sizes == [(800, 1066)]
    assert tuple(fs[8].shape[-2:]) == (52, 68) and tuple(ft[8].shape[-2:]) == (100, 136)
    assert mtpd.content_cells(fs.sizes, 8, (52, 68)) == [(50, 67)]
    assert mtpd.content_cells(ft.sizes, 8, (100, 136)) == [(100, 134)]

    def corr(a, b, mask):
        keep = mask.expand_as(a).bool()
        a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    for s in (8, 16):
        aligned, mask = mtpd.align(fs[s], ft[s].shape[-2:], s, fs.sizes, ft.sizes)
        padded, _ = mtpd.align(fs[s], ft[s].shape[-2:], s)  # before: the whole padded map resized
        assert mask is not None and mask[0, 0, :, -1].sum() == 0  # the teacher's padded columns
        assert corr(aligned, ft[s], mask) > 0.95
        assert corr(aligned, ft[s], mask) > corr(padded, ft[s], mask) + 0.1


def test_padding_is_left_out_of_the_loss_and_the_costs():
    """With the images' sizes known, whatever a teacher's map holds on its padding changes neither the
    L2 feature loss nor the adaptation costs; without sizes it does (the old behaviour)."""
    torch.manual_seed(0)
    fs = mtpd.Levels({8: torch.randn(2, 4, 6, 6)}, sizes=[(48, 48), (40, 32)])  # image 2 leaves padding
    ft = mtpd.Levels({8: torch.randn(2, 4, 6, 6)}, sizes=[(48, 48), (40, 32)])
    other = mtpd.Levels({8: ft[8].clone()}, ft.sizes)
    other[8][1, :, 5:, :] = 100.0  # rows 5.. and columns 4.. of image 2 are padding
    other[8][1, :, :, 4:] = -100.0
    ad = mtpd.build_adapters(fs, ft, conv=True)
    assert mtpd.feature_loss(fs, ft, ad).item() == pytest.approx(mtpd.feature_loss(fs, other, ad).item(),
                                                                 rel=1e-6)
    plain = lambda f: dict(f)  # no sizes
    assert mtpd.feature_loss(plain(fs), plain(other), ad).item() != pytest.approx(
        mtpd.feature_loss(plain(fs), plain(ft), ad).item(), rel=1e-3)
    c1 = mtpd.adaptation_costs([("fit", {"s": fs, "t": ft}), ("held", {"s": fs, "t": ft})])
    c2 = mtpd.adaptation_costs([("fit", {"s": fs, "t": other}), ("held", {"s": fs, "t": other})])
    assert c1["s"]["t"] == pytest.approx(c2["s"]["t"], rel=1e-9)


def test_image_sizes_on_one_side_only_are_an_error():
    """Sizes on one side only used to fall back, silently, to resizing the padded maps (the misalignment
    the sizes are there to avoid): now a one-line ValueError naming the side without them, in the loss,
    the adapter and the cost statistics, whether or not the maps differ in size."""
    torch.manual_seed(0)
    fs = mtpd.Levels({8: torch.randn(2, 4, 6, 6)}, sizes=[(48, 48), (40, 32)])
    ft = mtpd.Levels({8: torch.randn(2, 4, 12, 12)}, sizes=[(96, 96), (80, 64)])
    ad = mtpd.build_adapters(fs, ft, conv=True)
    mtpd.feature_loss(fs, ft, ad)  # sizes on both sides: fine
    for student, teacher, lacking in ((dict(fs), ft, "the student"), (fs, mtpd.Levels(ft), "the teacher"),
                                      (fs, {8: ft[8][:, :, :6, :6]}, "the teacher")):  # the last: one size
        with pytest.raises(ValueError, match=f"features of {lacking} carry no image sizes") as e:
            mtpd.feature_loss(student, teacher, ad)
        assert "\n" not in str(e.value) and "capture_features(backbone, transform)" in str(e.value)
    with pytest.raises(ValueError, match="features of the student carry no image sizes"):
        ad["8"](fs[8], (12, 12), 8, None, ft.sizes)
    # the cost statistics: one model without sizes among models with them, named in the message
    third = mtpd.Levels({8: torch.randn(2, 3, 6, 6)}, fs.sizes)
    for plain in ("t", "u"):
        feats = {"s": fs, "t": ft, "u": third, plain: dict(fs if plain == "t" else third)}
        with pytest.raises(ValueError, match=f"features of '{plain}' carry no image sizes") as e:
            mtpd.adaptation_costs([("fit", feats), ("held", feats)])
        assert "\n" not in str(e.value) and "stride_keyed(..., batch.image_sizes)" in str(e.value)


def test_a_student_hooked_without_its_transform_is_refused_against_sized_teachers():
    """capture_features without the detector's transform gives features without sizes; against teacher
    features that carry them (fpn_features) the training step is an error, not a padded-map resize."""
    torch.manual_seed(0)
    student, teacher = tiny_detector(scale=0.5), mtpd.freeze(tiny_detector())
    images, targets = tiny_batch()
    with torch.no_grad():
        adapters = [mtpd.build_adapters(fpn_features(student.eval(), images), fpn_features(teacher, images))]
    feats, hook = mtpd.capture_features(student.backbone)
    try:
        with pytest.raises(ValueError, match="features of the student carry no image sizes"):
            mtpd.distill_losses(student.train(), images, targets, feats, [teacher], adapters, fpn_features)
    finally:
        hook.remove()
    assert sorted(feats) == [8, 16, 32, 64, 128] and feats.sizes is None  # the hook ran, without sizes


def test_no_sizes_and_maps_of_different_sizes_warn_once(monkeypatch):
    """Without sizes on either side, maps of different sizes are resized as whole padded maps: warned
    once per process (a module flag), not at every step; in the loss and in the cost statistics."""
    lo, hi = {8: torch.randn(2, 4, 4, 4)}, {8: torch.randn(2, 4, 8, 8)}
    ad = mtpd.build_adapters(lo, hi)
    batch = {"lo": lo, "hi": hi, "hi2": {8: torch.randn(2, 3, 8, 8)}}
    for run in (lambda: mtpd.feature_loss(lo, hi, ad), lambda: mtpd.adaptation_costs([("fit", batch),
                                                                                       ("held", batch)])):
        monkeypatch.setattr(mtpd, "_warned_padded", False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # so that only the module's flag can hold the second one back
            run()
            run()
        msgs = mtpd_warnings(caught)
        assert len(msgs) == 1 and "resizing the whole padded maps" in msgs[0] and "\n" not in msgs[0]
        assert "stride_keyed(..., batch.image_sizes)" in msgs[0]
        assert [w.category for w in caught if str(w.message) == msgs[0]] == [UserWarning]


def test_no_sizes_on_maps_of_one_size_and_sizes_everywhere_stay_silent(monkeypatch):
    """Nothing is resized without sizes when the maps have one size; with sizes on every side the maps
    are aligned by the images' extent: no warning either way (and the flag stays unset)."""
    monkeypatch.setattr(mtpd, "_warned_padded", False)
    torch.manual_seed(0)
    a, b = {8: torch.randn(2, 4, 6, 6)}, {8: torch.randn(2, 3, 6, 6)}
    fs = mtpd.Levels({8: torch.randn(2, 4, 6, 6)}, sizes=[(48, 48), (40, 32)])
    ft = mtpd.Levels({8: torch.randn(2, 4, 12, 12)}, sizes=[(96, 96), (80, 64)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mtpd.feature_loss(a, b, mtpd.build_adapters(a, b))
        mtpd.adaptation_costs([("fit", {"a": a, "b": b}), ("held", {"a": a, "b": b})])
        mtpd.feature_loss(fs, ft, mtpd.build_adapters(fs, ft))
        mtpd.adaptation_costs([("fit", {"s": fs, "t": ft}), ("held", {"s": fs, "t": ft})])
    assert mtpd_warnings(caught) == [] and not mtpd._warned_padded


def test_eval_mode_restores_every_submodules_own_mode_also_on_error():
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.Sequential(nn.BatchNorm2d(1)))
    net.train()
    net[2].eval()  # mixed modes: a single model.train(mode) afterwards would lose this one
    other = nn.BatchNorm2d(1).train()
    before = [m.training for m in (*net.modules(), other)]
    with mtpd.eval_mode(net, other):
        assert not any(m.training for m in (*net.modules(), other))
        net(torch.randn(2, 1, 3, 3))
    assert [m.training for m in (*net.modules(), other)] == before
    assert net[1].num_batches_tracked.item() == 0  # the forward inside left the statistics alone
    with pytest.raises(RuntimeError, match="boom"):
        with mtpd.eval_mode(net):
            raise RuntimeError("boom")
    assert [m.training for m in (*net.modules(), other)] == before


@sizeless
def test_adapter_output_shapes_and_modules():
    s = {8: torch.randn(2, 4, 4, 4), 16: torch.randn(2, 4, 2, 2)}
    t = {8: torch.randn(2, 6, 8, 8), 16: torch.randn(2, 6, 4, 4), 4: torch.randn(2, 6, 16, 16)}
    ad = mtpd.build_adapters(s, t)
    assert sorted(ad) == ["16", "8"]  # paired by stride; stride 4 has no student level
    assert isinstance(ad["8"].proj, nn.Conv2d) and ad["8"](s[8], (8, 8)).shape == (2, 6, 8, 8)
    same = mtpd.build_adapters(s, s)
    assert isinstance(same["8"].proj, nn.Identity) and torch.equal(same["8"](s[8], (4, 4)), s[8])


def test_no_common_stride_is_an_error():
    with pytest.raises(ValueError, match="no common FPN stride"):
        mtpd.common_strides({4: 0, 8: 0}, {16: 0, 32: 0})


def test_stride_keyed_pairs_tiny_p6_p7():
    # At a 64-px input P5, P6 and P7 are 2x2, 1x1 and 1x1: strides come from the level order, not sizes.
    feats = [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2),
             torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)]
    assert sorted(mtpd.stride_keyed((64, 64), feats)) == [8, 16, 32, 64, 128]
    assert sorted(mtpd.stride_keyed((800, 1216), [torch.zeros(1, 1, 200, 304)] * 5)) == [4, 8, 16, 32, 64]


def test_stride_keyed_refuses_a_single_map():
    """A backbone without an FPN returns one [N, C, h, w] map; iterating it made one "level" per image of
    the batch. Now a one-line TypeError, also from a hooked backbone's forward; wrapped, it is one level."""
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"wrap a single map as \{'0': x\}") as e:
        mtpd.stride_keyed((64, 64), x)
    assert "\n" not in str(e.value) and "[2, 3, 8, 8]" in str(e.value)
    assert list(mtpd.stride_keyed((64, 64), {"0": x})) == [8]
    backbone = nn.Conv2d(3, 3, 8, stride=8)  # no FPN: one map
    store, hook = mtpd.capture_features(backbone)
    try:
        with pytest.raises(TypeError, match="not a neck's levels"):
            backbone(torch.zeros(2, 3, 64, 64))
    finally:
        hook.remove()
    assert len(store) == 0 and backbone(torch.zeros(2, 3, 64, 64)).shape == (2, 3, 8, 8)  # hook gone


def test_feature_loss_values():
    f = {8: torch.randn(2, 3, 4, 4)}
    ident = mtpd.build_adapters(f, f)
    assert mtpd.feature_loss(f, f, ident).item() == 0.0
    # Hand-computed: student zeros vs teacher t -> mean(t^2) / var(t).
    t = {8: torch.tensor([1.0, -1.0, 3.0, -3.0]).reshape(1, 1, 2, 2)}
    z = {8: torch.zeros(1, 1, 2, 2)}
    expected = (1 + 1 + 9 + 9) / 4 / torch.tensor([1.0, -1.0, 3.0, -3.0]).var()
    assert torch.isclose(mtpd.feature_loss(z, t, mtpd.build_adapters(z, t)), expected, atol=1e-5)

def test_feature_loss_pools_levels_by_pixels():
    # Two levels of different sizes; student zeros. Level 8: t = [1, 2, 3, 4] (SSE 30, 4 * var 4 * 5/3);
    # level 16: t = [0, 2] (SSE 4, 2 * var 2 * 2). Pooled: (30 + 4) / (20/3 + 4) = 3.1875 (a mean of the
    # per-level ratios would be (4.5 + 1) / 2 = 2.75).
    t = {8: torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2),
         16: torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)}
    z = {s: torch.zeros_like(v) for s, v in t.items()}
    levels = {}
    loss = mtpd.feature_loss(z, t, mtpd.build_adapters(z, t), levels=levels)
    assert abs(loss.item() - 34 / (20 / 3 + 4)) < 1e-5
    assert abs(levels[8].item() - 30 / (20 / 3 + 4)) < 1e-5
    assert abs(levels[16].item() - 4 / (20 / 3 + 4)) < 1e-5
    # the same error per pixel on a 4x4 and a 2x2 level: shares in proportion to the pixels (16 : 4)
    t = {8: torch.tensor([1.0, -1.0]).repeat(8).reshape(1, 1, 4, 4),
         16: torch.tensor([1.0, -1.0]).repeat(2).reshape(1, 1, 2, 2)}
    z, levels = {s: torch.zeros_like(v) for s, v in t.items()}, {}
    loss = mtpd.feature_loss(z, t, mtpd.build_adapters(z, t), levels=levels)
    assert abs(levels[8].item() / levels[16].item() - 4.0) < 1e-5
    assert abs(sum(v.item() for v in levels.values()) - loss.item()) < 1e-6


def test_conv_adapter_even_when_widths_match():
    f = {8: torch.randn(1, 4, 2, 2)}
    assert isinstance(mtpd.build_adapters(f, f)["8"].proj, torch.nn.Identity)
    conv = mtpd.build_adapters(f, f, conv=True)["8"].proj
    assert isinstance(conv, torch.nn.Conv2d) and conv.weight.shape == (4, 4, 1, 1)


def test_inherit_copies_neck_by_stride_and_head_by_type():
    from models import inherit
    images, _ = tiny_batch(1, 64)
    torch.manual_seed(0)
    student, retina, mask = tiny_detector(scale=0.5), tiny_detector(), tiny_detector("maskrcnn_r18")
    body = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("backbone.body.")}
    copied, of = inherit(student, retina, images)  # the same RetinaNet at another scale: neck and head
    own, theirs = student.state_dict(), retina.state_dict()
    assert copied == of
    assert all(torch.equal(own[k], theirs[k]) for k in own if k.startswith(("backbone.fpn.", "head.")))
    assert all(torch.equal(own[k], v) for k, v in body.items())  # the body keeps the student's weights
    student = tiny_detector(scale=0.5)
    head = {k: v.clone() for k, v in student.state_dict().items() if k.startswith("head.")}
    copied, of = inherit(student, mask, images)
    own, theirs = student.state_dict(), mask.state_dict()
    # Mask R-CNN's FPN block 1 is stride 8, RetinaNet's block 0: paired by stride, not by index
    for block in ("inner_blocks", "layer_blocks"):
        for i in range(3):
            assert torch.equal(own[f"backbone.fpn.{block}.{i}.0.weight"],
                               theirs[f"backbone.fpn.{block}.{i + 1}.0.weight"])
    assert 0 < copied < of and all(torch.equal(student.state_dict()[k], v) for k, v in head.items())
    with pytest.raises(ValueError, match="nothing to inherit"):  # other widths, another detector type
        inherit(tiny_detector(scale=0.5), tiny_detector("maskrcnn_r18", fpn_channels=32), images)


def test_gradients_reach_student_and_adapter_never_teacher():
    torch.manual_seed(0)
    student, teacher = tiny_detector(scale=0.5), mtpd.freeze(tiny_detector("retinanet_r34"))
    images, targets = tiny_batch()
    feats, hook = mtpd.capture_features(student.backbone, student.transform)  # sizes, as the teacher has
    with torch.no_grad():
        fs, ft = fpn_features(student.eval(), images), fpn_features(teacher, images)
    # an upsampling adapter: same widths, a 32-px student's P3 smaller than a 64-px teacher's
    assert fs[8].shape[1] == ft[8].shape[1] and fs[8].shape[-2:] != ft[8].shape[-2:]
    adapters = [mtpd.build_adapters(fs, ft)]
    student.train()
    losses = mtpd.distill_losses(student, images, targets, feats, [teacher], adapters, fpn_features, lam=1.0)
    hook.remove()
    assert "distill" in losses and losses["distill"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert student.backbone.body.conv1.weight.grad.abs().sum() > 0
    # the distillation term alone moves the student's backbone (it is not only the detection loss)
    student.zero_grad()
    feats, hook = mtpd.capture_features(student.backbone, student.transform)
    losses = mtpd.distill_losses(student, images, targets, feats, [teacher], adapters, fpn_features)
    losses["distill"].backward()
    hook.remove()
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# §3.2: adaptation cost
# ---------------------------------------------------------------------------------------------------------
def _feats(seed, c=6, n=4, hw=8):
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


def test_cost_zero_for_affine_map_and_positive_when_rank_is_lost():
    batches = []
    w, b = torch.randn(6, 6, generator=torch.Generator().manual_seed(9)), torch.randn(6, 1, 1)
    proj = torch.zeros(6, 6)
    proj[:2, :2] = torch.eye(2)  # C keeps only 2 of A's 6 directions
    for i, split in enumerate(["fit", "fit", "held"]):
        a = _feats(i)
        bb = torch.einsum("dc,nchw->ndhw", w, a) + b  # B = affine(A), invertible
        cc = torch.einsum("dc,nchw->ndhw", proj, a)  # C = rank-2 projection of A
        batches.append((split, {"A": {8: a}, "B": {8: bb}, "C": {8: cc}}))
    cost = mtpd.adaptation_costs(batches, ridge=1e-6)
    assert cost["A"]["B"] < 1e-4 and cost["B"]["A"] < 1e-4  # affine both ways
    assert cost["A"]["C"] < 1e-4  # a projection of A is easy to reach from A ...
    assert cost["C"]["A"] > 0.5  # ... but A cannot be recovered from its projection: ~4/6 of variance lost


def test_cost_matches_direct_least_squares():
    fit_a, fit_b, held_a, held_b = _feats(1), _feats(2, c=3), _feats(3), _feats(4, c=3)
    cost = mtpd.adaptation_costs([("fit", {"A": {8: fit_a}, "B": {8: fit_b}}),
                                  ("held", {"A": {8: held_a}, "B": {8: held_b}})], ridge=0.0)
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()  # noqa: E731
    x = torch.cat([rows(fit_a), torch.ones(fit_a.numel() // 6, 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(x, rows(fit_b)).solution
    xh = torch.cat([rows(held_a), torch.ones(held_a.numel() // 6, 1, dtype=torch.float64)], 1)
    yh = rows(held_b)
    expected = ((xh @ w - yh) ** 2).sum() / ((yh - yh.mean(0)) ** 2).sum()
    assert abs(cost["A"]["B"] - expected.item()) < 1e-8


@sizeless
def test_least_squares_adapters_start_at_the_affine_map_across_resolutions():
    """A teacher whose levels are an affine map of the student's, the second level at twice the student's
    resolution (bilinear, still linear): the least-squares adapters reproduce the teacher exactly, and
    the feature loss starts at 0 (where a conv adapter at torch's init does not)."""
    w, b = torch.randn(5, 3, generator=torch.Generator().manual_seed(3)), torch.randn(5, 1, 1)
    aff = lambda x: torch.einsum("dc,nchw->ndhw", w, x) + b  # noqa: E731
    up = lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    student = {8: _feats(1, c=3), 16: _feats(2, c=3, hw=2)}
    teacher = {8: aff(student[8]), 16: aff(up(student[16]))}
    moments = mtpd.accumulate_moments({}, "fit", {"s": student, "t": teacher})
    adapters = mtpd.build_adapters(student, teacher, conv=True)
    assert mtpd.feature_loss(student, teacher, adapters).item() > 0.1
    mtpd.least_squares_adapters(adapters, moments, "s", "t", ridge=0.0)
    for s in (8, 16):
        out = adapters[str(s)](student[s], teacher[s].shape[-2:])
        assert torch.allclose(out, teacher[s], atol=1e-4), s
    assert mtpd.feature_loss(student, teacher, adapters).item() < 1e-6
    with pytest.raises(ValueError, match="1x1 conv"):  # an identity adapter has nothing to fit
        mtpd.least_squares_adapters(mtpd.build_adapters(student, student), moments, "s", "t")


@sizeless
def test_cost_resizes_across_resolutions():
    a = _feats(5, hw=4)
    up = torch.nn.functional.interpolate(a, size=(8, 8), mode="bilinear", align_corners=False)
    cost = mtpd.adaptation_costs([("fit", {"lo": {8: a}, "hi": {8: up}}),
                                  ("held", {"lo": {8: a}, "hi": {8: up}})], ridge=1e-8)
    assert cost["lo"]["hi"] < 1e-6 and cost["hi"]["lo"] > cost["lo"]["hi"]


@sizeless
def test_cost_matrix_blocks_equal_pairwise_fits():
    """One Gram matrix per level and size holds every pair: each entry equals fitting that pair alone,
    also across resolutions and with batches of different sizes pooled."""
    def batch(seed, hw):
        return {"A": {8: _feats(seed, hw=hw)}, "B": {8: _feats(seed + 50, c=3, hw=hw)},
                "L": {8: _feats(seed + 99, c=5, hw=hw // 2)}}
    batches = [("fit", batch(1, 8)), ("fit", batch(2, 4)), ("held", batch(3, 8)), ("held", batch(4, 4))]
    full = mtpd.adaptation_costs(batches)
    for a in "ABL":
        for b in "ABL":
            if a != b:
                alone = mtpd.adaptation_costs([(sp, {a: f[a], b: f[b]}) for sp, f in batches])
                assert full[a][b] == pytest.approx(alone[a][b], rel=1e-9)


def test_cost_needs_held_out_split():
    with pytest.raises(ValueError, match="held-out"):
        mtpd.adaptation_costs([("fit", {"A": {8: _feats(1)}, "B": {8: _feats(2)}})])


# ---------------------------------------------------------------------------------------------------------
# §3.2, Algorithm 1: Backward Greedy Selection
# ---------------------------------------------------------------------------------------------------------
COST = {"S": {"T1": 0.5, "T2": 0.8, "T3": 0.9},
        "T1": {"S": 0.1, "T2": 0.3, "T3": 0.6},
        "T2": {"S": 0.1, "T1": 0.2, "T3": 0.4},
        "T3": {"S": 0.1, "T1": 0.2, "T2": 0.1}}
AP = {"T1": 0.30, "T2": 0.35, "T3": 0.40}


def test_bgs_builds_backwards_from_best_teacher():
    assert mtpd.backward_greedy_selection(COST, "S", AP, k=3) == ["T1", "T2", "T3"]


def test_bgs_k_limit():
    assert mtpd.backward_greedy_selection(COST, "S", AP, k=1) == ["T3"]
    assert mtpd.backward_greedy_selection(COST, "S", AP, k=2) == ["T2", "T3"]
    with pytest.raises(ValueError):
        mtpd.backward_greedy_selection(COST, "S", AP, k=0)


def test_bgs_stops_when_student_is_closer_than_any_bridge():
    cost = json.loads(json.dumps(COST))
    cost["S"]["T2"] = 0.25  # now S -> T2 (0.25) beats the only bridge T1 -> T2 (0.3)
    assert mtpd.backward_greedy_selection(cost, "S", AP, k=3) == ["T2", "T3"]
    cost["S"]["T3"] = 0.05  # the student is closer to the best teacher than anyone
    assert mtpd.backward_greedy_selection(cost, "S", AP, k=3) == ["T3"]


def test_bgs_picks_cheapest_bridge_not_best_ap():
    cost = json.loads(json.dumps(COST))
    cost["T1"]["T3"], cost["T2"]["T3"] = 0.05, 0.3  # T1 is the cheaper bridge into T3 despite lower AP
    order = mtpd.backward_greedy_selection(cost, "S", AP, k=2)
    assert order == ["T1", "T3"]


def test_forward_greedy_takes_the_cheapest_stronger_next_teacher_and_ends_with_the_best():
    # from S the cheapest is T1 (0.5); from T1, T2 (0.3) beats T3 (0.6); the last place goes to T3
    assert mtpd.forward_greedy_selection(COST, "S", AP, k=3) == ["T1", "T2", "T3"]
    assert mtpd.forward_greedy_selection(COST, "S", AP, k=2) == ["T1", "T3"]  # one place left: the best
    assert mtpd.forward_greedy_selection(COST, "S", AP, k=1) == ["T3"]
    cost = json.loads(json.dumps(COST))
    cost["S"]["T2"] = 0.2  # S -> T2 is cheapest; from T2 only T3 is stronger (T2 -> T1 = 0.2 is not taken)
    assert mtpd.forward_greedy_selection(cost, "S", AP, k=3) == ["T2", "T3"]
    cost["S"]["T3"] = 0.1  # the best teacher is the cheapest first step: nothing before it
    assert mtpd.forward_greedy_selection(cost, "S", AP, k=3) == ["T3"]
    with pytest.raises(ValueError):
        mtpd.forward_greedy_selection(COST, "S", AP, k=0)
    tied = dict(AP, T2=AP["T3"])  # T2 ties with the best (T3 wins the tie on its name) and is taken first
    cost["S"].update(T2=0.05, T3=0.9)
    assert mtpd.forward_greedy_selection(cost, "S", tied, k=3) == ["T2", "T3"]


def test_forward_and_backward_greedy_differ_where_the_cheapest_first_step_is_a_dead_end():
    # T1 is nearest the student but far from T3; T2 is the bridge into T3: BGS builds T2 -> T3 backwards,
    # the forward planner walks S -> T1 first
    cost = json.loads(json.dumps(COST))
    cost["S"].update(T1=0.2, T2=0.7, T3=0.9)
    cost["T1"]["T3"], cost["T2"]["T3"] = 0.8, 0.1
    assert mtpd.backward_greedy_selection(cost, "S", AP, k=2) == ["T2", "T3"]
    assert mtpd.forward_greedy_selection(cost, "S", AP, k=2) == ["T1", "T3"]


def test_progressive_schedule_runs_each_teacher_in_order_from_the_previous_stages_student():
    calls = []

    def run_stage(student, teacher, i):  # a student named by what trained it, as a checkpoint path names one
        calls.append((i, teacher, student))
        return f"{student}+{teacher}", f"AP after {teacher}"

    last, results = mtpd.progressive_distillation("ots", ["A", "B", "C"], run_stage)
    assert calls == [(0, "A", "ots"), (1, "B", "ots+A"), (2, "C", "ots+A+B")]
    assert last == "ots+A+B+C" and results == ["AP after A", "AP after B", "AP after C"]
    # a module trained in place: each stage starts from the weights the previous one left
    student, seen = nn.Linear(1, 1, bias=False), []
    nn.init.zeros_(student.weight)

    def train_in_place(model, teacher, i):
        seen.append(model.weight.item())
        with torch.no_grad():
            model.weight += 1
        return model, i

    assert mtpd.progressive_distillation(student, ["A", "B"], train_in_place) == (student, [0, 1])
    assert seen == [0.0, 1.0]
    assert mtpd.progressive_distillation(student, [], train_in_place) == (student, [])  # no teacher, no stage


# ---------------------------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------------------------
def test_shapes_is_coco_and_deterministic(shapes, tmp_path):
    root, stats = shapes
    again = data.make_shapes(str(tmp_path), n_train=12, n_val=6, size=64, seed=3, progress=False)
    assert again == stats
    for split in ("train", "val"):
        a = open(os.path.join(root, "annotations", f"instances_{split}2017.json")).read()
        assert a == open(os.path.join(tmp_path, "annotations", f"instances_{split}2017.json")).read()
    ann = json.load(open(os.path.join(root, "annotations", "instances_train2017.json")))
    assert {c["id"] for c in ann["categories"]} == set(data.SHAPES.values())
    for a in ann["annotations"]:
        assert set(a) >= {"bbox", "area", "iscrowd", "segmentation", "category_id", "image_id"}
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64.01 and y + h <= 64.01


def test_default_benchmark_populates_all_size_buckets(tmp_path):
    stats = data.make_shapes(str(tmp_path), n_train=60, n_val=1, size=128, seed=0, progress=False)
    assert min(stats["train"][b] for b in ("small", "medium", "large")) > 5


def test_dataset_round_trip(shapes):
    root, _ = shapes
    ds = data.CocoDetection(root, "train")
    ann = json.load(open(os.path.join(root, "annotations", "instances_train2017.json")))
    cats = sorted(c["id"] for c in ann["categories"])
    assert ds.category_ids == cats and ds.cat_to_label[cats[-1]] == len(cats)  # 9 -> 7: contiguous labels
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    mine = [a for a in ann["annotations"] if a["image_id"] == ds.ids[0]]
    for a, box, label, mask in zip(mine, target["boxes"], target["labels"], target["masks"]):
        x, y, w, h = a["bbox"]
        assert torch.allclose(box, torch.tensor([x, y, x + w, y + h]))
        assert ds.category_ids[label - 1] == a["category_id"]
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert mask.dtype == torch.uint8 and xs.min() >= int(x) - 1 and xs.max() <= x + w + 1
        assert abs(mask.sum().item() - a["area"]) < 0.25 * a["area"] + 10


def test_flip_mirrors_boxes_and_masks(shapes):
    root, _ = shapes
    plain, flipped = data.CocoDetection(root, "train"), data.CocoDetection(root, "train", flip=True)
    for seed in range(20):  # p = 0.5: some seed flips
        torch.manual_seed(seed)
        img, tgt = flipped[0]
        if not torch.equal(img, plain[0][0]):
            break
    img0, tgt0 = plain[0]
    assert torch.equal(img, img0.flip(-1)) and torch.equal(tgt["masks"], tgt0["masks"].flip(-1))
    assert torch.allclose(tgt["boxes"][:, [0, 2]], 64 - tgt0["boxes"][:, [2, 0]])


def test_coco_eval_of_ground_truth_is_perfect(shapes):
    root, _ = shapes
    ds = data.CocoDetection(root, "val", masks=False)
    gt = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
          for a in ds.coco.dataset["annotations"]]
    s = data.coco_summary(ds.coco, gt, "bbox")
    assert s["AP"] > 0.99 and s["AP50"] > 0.99
    wrong = [{**d, "category_id": data.SHAPES["circle"] if d["category_id"] != data.SHAPES["circle"]
              else data.SHAPES["star"]} for d in gt]
    assert data.coco_summary(ds.coco, wrong, "bbox")["AP"] < 0.01


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", [("retinanet_r50", "retinanet_resnet50_fpn"),
                                         ("maskrcnn_r50", "maskrcnn_resnet50_fpn")])
def test_zoo_matches_torchvision_state_dict(ours, theirs):
    import torchvision
    a = build_detector(ours, 91).state_dict()
    b = getattr(torchvision.models.detection, theirs)(weights=None, weights_backbone=None).state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_swin_and_maskrcnn_give_stride_keyed_features():
    images, _ = tiny_batch(1, 64)
    with torch.no_grad():
        swin = fpn_features(build_detector("retinanet_swin_t", 3, min_size=64, max_size=64).eval(), images)
        mask = fpn_features(tiny_detector("maskrcnn_r18").eval(), images)
    assert sorted(swin) == [8, 16, 32, 64, 128] and swin[8].shape == (1, 256, 8, 8)
    assert sorted(mask) == [4, 8, 16, 32, 64] and mask[4].shape == (1, 16, 16, 16)
    assert sorted(mtpd.build_adapters(mask, swin)) == ["16", "32", "64", "8"]  # paired by stride


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="retinanet_r18"):
        build_detector("retinanet_vgg", 3)


# ---------------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_loop_changes_weights_and_is_deterministic(shapes):
    root, _ = shapes
    results = []
    for _ in range(2):
        loader, _ = engine.loaders(root, 4, seed=1, masks=False)
        torch.manual_seed(0)
        model = tiny_detector()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        teacher = tiny_detector("retinanet_r34")
        engine.train_loop(model, loader, 3, torch.device("cpu"), 5, dict(train.RECIPE, lr=1e-3), [teacher])
        results.append(model.state_dict())
    assert any(not torch.equal(before[k], results[0][k]) for k in before)
    assert all(torch.equal(results[0][k], results[1][k]) for k in before)

@pytest.mark.slow
def test_reproduce_tiny_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = run_cli("--preset", "tiny", "--out", str(out), cwd=str(tmp_path))  # bare flags are reproduce's
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(out / "results.json"))
    names = ["ots"] + [m["label"] for m in train.PRESETS["tiny"]["pool"]]
    assert sorted(res["cost"]) == sorted(names)
    assert all(res["cost"][a][b] >= 0 for a in names for b in names if a != b)
    assert res["order"] and set(res["order"]) <= set(names[1:])
    assert list(res["runs"]) == ["ots", "long", "long_restart", "direct", "ensemble", "mtpd"]
    for run in res["runs"]:
        m = res["runs"][run]
        assert set(m) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"} and 0 <= m["AP"] <= 1
    assert res["runs"]["long"] != res["runs"]["ots"]  # it trained further
    assert json.load(open(out / "order.json"))["order"] == res["order"]
    # §3.5: both students at every stage boundary, their landscapes centred on their loss, and the report
    gen, k = res["analysis"]["generalization"], len(res["order"])
    assert [p["step"] for p in gen["mtpd"]] == [i * res["budget_steps"] // k for i in range(k + 1)]
    assert [p["step"] for p in gen["long"]] == [p["step"] for p in gen["mtpd"]]
    assert gen["long"][0]["det_loss"] == gen["mtpd"][0]["det_loss"]  # both start from the OTS student
    assert gen["long"][-1]["det_loss"] != gen["mtpd"][-1]["det_loss"]
    assert all(p["det_loss"] > 0 for p in gen["long"])
    for land in res["analysis"]["landscape"].values():
        mid = len(land["alphas"]) // 2
        assert all(abs(c[mid] - land["loss0"]) < 1e-4 * land["loss0"] for c in land["curves"])
    assert "## Loss landscape" in open(out / "report.md").read()
    # the exported student is a plain state_dict that loads strictly into build_detector
    spec = json.load(open(out / "student_spec.json"))
    sd = torch.load(out / "student.pt", weights_only=True)
    model = engine.build(spec)
    model.load_state_dict(sd, strict=True)
    assert not any("adapter" in k for k in sd)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert any(rec["event"] == "done" for rec in log)
    # every 10 iterations: the detection terms and, for distilled runs, the feature loss of every level
    steps = [rec for rec in log if rec["event"] == "step" and rec["desc"] == "direct"]
    b = res["budget_steps"]
    assert [rec["step"] for rec in steps] == sorted(set(range(0, b, 10)) | {b - 1})
    assert all({"classification", "bbox_regression", "distill"} <= set(rec) for rec in steps)
    assert sorted(steps[0]["distill_levels"], key=int) == ["8", "16", "32", "64", "128"]
    assert all(abs(sum(rec["distill_levels"].values()) - rec["distill"]) < 1e-4 * rec["distill"]
               for rec in steps)
    assert all(not rec["distill_levels"] for rec in log if rec["event"] == "step" and rec["desc"] == "long")
    ratio = res["runs"]["direct"]["distill_ratio_start"]
    detection = steps[0]["classification"] + steps[0]["bbox_regression"]
    assert abs(ratio - steps[0]["distill"] / detection) < 1e-6
    assert "## Distillation vs detection loss" in open(out / "report.md").read()
    # the §3.5 control: MTPD's schedule without a teacher, one checkpoint per stage
    assert all((out / "ckpt" / f"long_restart_stage{i + 1}.pt").is_file() for i in range(len(res["order"])))
    restarts = [rec for rec in log if rec["event"] == "trained" and rec["desc"].startswith("long_restart")]
    assert [(rec["desc"], rec["steps"]) for rec in restarts] == [
        (f"long_restart_stage{i + 1}", train.PRESETS["tiny"]["stage_steps"])
        for i in range(len(res["order"]))]
    # a second run reuses the folder: no checkpoint is rewritten, and it prints the same table
    mtimes = {f: os.path.getmtime(out / "ckpt" / f) for f in os.listdir(out / "ckpt")}
    r2 = run_cli("reproduce", "--preset", "tiny", "--out", str(out), cwd=str(tmp_path))
    assert "inherited" not in r2.stdout and "inherited 28 of the student's 28" in r.stdout
    # a cached checkpoint trained with another recipe is refused, not silently reused
    bad = run_cli("--preset", "tiny", "--out", str(out), "--lam", "3", cwd=str(tmp_path))
    assert bad.returncode == 2 and "direct.pt was trained with another recipe" in bad.stderr
    assert r2.returncode == 0
    assert mtimes == {f: os.path.getmtime(out / "ckpt" / f) for f in os.listdir(out / "ckpt")}
    assert r.stdout.split("run ")[-1].split("wall")[0] == r2.stdout.split("run ")[-1].split("wall")[0]
    # Fig. 4 on top: only the PKD runs train; the L2 rows are the ones above
    r3 = run_cli("reproduce", "--preset", "tiny", "--out", str(out), "--mechanism", "pkd", cwd=str(tmp_path))
    assert r3.returncode == 0, r3.stderr[-2000:]
    mech = json.load(open(out / "results.json"))["mechanisms"]
    assert sorted(mech) == ["l2", "pkd"] and mech["l2"]["mtpd"] == res["runs"]["mtpd"]
    assert 0 <= mech["pkd"]["direct"]["AP"] <= 1 and 0 <= mech["pkd"]["mtpd"]["AP"] <= 1
    k = len(res["order"])  # PKD trained another student than the L2 (tiny APs can both be 0: compare weights)
    pkd, l2 = (torch.load(out / "ckpt" / f"mtpd{m}_stage{k}.pt", weights_only=True)["model"]
               for m in ("_pkd", ""))
    assert any(not torch.equal(pkd[x], l2[x]) for x in l2)
    new = set(os.listdir(out / "ckpt")) - set(mtimes)
    assert new == {"direct_pkd.pt"} | {f"mtpd_pkd_stage{i + 1}.pt" for i in range(len(res["order"]))}
    assert "## Mechanisms" in open(out / "report.md").read()


@pytest.mark.slow
def test_reproduce_several_seeds_share_the_pool_and_give_mean_and_spread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the built-in data is written under the working directory
    # with the capacity-gap study's rows (the `gap` preset's `premise`): direct from every teacher, orders
    monkeypatch.setitem(train.PRESETS, "tiny", dict(train.PRESETS["tiny"], premise=True))
    out = tmp_path / "run"
    train.main(["--preset", "tiny", "--out", str(out), "--seeds", "0", "1"])  # no subcommand: reproduce
    res = json.load(open(out / "results.json"))
    assert res["seeds"] == [0, 1] and sorted(res["per_seed"]) == ["0", "1"]
    pool = [m["label"] for m in train.PRESETS["tiny"]["pool"]]
    assert sorted(os.listdir(out / "ckpt")) == sorted(f"{lab}.pt" for lab in pool)  # trained once, shared
    for s in ("0", "1"):
        assert json.load(open(out / f"seed{s}" / "results.json"))["runs"] == res["per_seed"][s]["runs"]
        assert not any(f.startswith("r18") for f in os.listdir(out / f"seed{s}" / "ckpt"))
    ap = [res["per_seed"][s]["runs"]["long"]["AP"] for s in ("0", "1")]
    runs = {s: res["per_seed"][s]["runs"] for s in ("0", "1")}
    assert runs["0"]["ots"] != runs["1"]["ots"]  # another seed, another run
    assert abs(res["mean"]["long"]["AP"] - sum(ap) / 2) < 1e-9
    assert abs(res["std"]["long"]["AP"] - abs(ap[0] - ap[1]) / 2 ** 0.5) < 1e-9
    gap = [runs[s]["mtpd"]["AP"] - runs[s]["direct"]["AP"] for s in ("0", "1")]
    assert abs(res["gaps"]["mtpd - direct"]["AP"]["mean"] - sum(gap) / 2) < 1e-9
    assert set(res["gaps"]) == {"direct - long", "mtpd - direct", "mtpd - long", "mtpd - long_restart",
                                "mtpd - ensemble", "mtpd - direct_bridge", "mtpd - mtpd_forward"}
    text = open(out / "report.md").read()
    assert "## Mean ± std over seeds" in text and "## Gaps" in text
    # Fig. 1: every teacher of the pool distilled directly, the final teacher's row being `direct` itself
    for s in ("0", "1"):
        one = json.load(open(out / f"seed{s}" / "results.json"))
        prem, order = one["premise"], one["order"]
        assert sorted(prem) == sorted(pool)
        assert all(prem[t]["cost"] == one["cost"]["ots"][t] and 0 <= prem[t]["AP"] <= 1 for t in pool)
        ckpts = out / f"seed{s}" / "ckpt"
        assert not (ckpts / f"direct_{order[-1]}.pt").exists()  # the final teacher's row is `direct`
        for t in pool:
            if t != order[-1]:  # trained at the direct row's budget and seed: its saved record says so
                rec = torch.load(ckpts / f"direct_{t}.pt", weights_only=True)["metrics"]
                assert rec["AP"] == prem[t]["AP"] and rec["recipe"]["steps"] == one["budget_steps"]
                assert rec["recipe"]["seed"] == json.load(open(ckpts.parent / "results.json"))["runs"][
                    "direct"]["recipe"]["seed"] and rec["recipe"]["teachers"] == [f"{t}.pt"]
        bridge = torch.load(ckpts / (f"direct_{order[0]}.pt" if len(order) > 1 else "direct.pt"),
                            weights_only=True)["metrics"]
        assert one["runs"]["direct_bridge"]["AP"] == bridge["AP"]
        forward = one["orders"]["forward"]
        assert one["orders"]["bgs"] == order and forward[-1] == order[-1]
        assert (one["runs"]["mtpd_forward"] == one["runs"]["mtpd"]) == (forward == order)
    t = pool[0]
    both = [res["per_seed"][s]["premise"][t]["AP"] for s in ("0", "1")]
    assert abs(res["premise"][t]["AP"][0] - sum(both) / 2) < 1e-9
    assert "## Direct distillation from each teacher" in text and "## Per seed (AP points): the gaps" in text


@pytest.mark.slow
def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    r = run_cli("train", "--model", "retinanet_vgg", "--out", str(tmp_path / "o"), cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "retinanet_r18" in r.stderr
    r = run_cli("train", "--model", "retinanet_r18", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no COCO-format data" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("order", "--cost", str(tmp_path / "none.json"), "--student", "s", "--k", "0")
    assert r.returncode == 2 and "--k" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "data").exists()
