"""The method file, mtpd.py, alone: hand-computed values on tiny tensors, both docstring examples run as
written, and the ways it refuses what it cannot do right. Run: python -m pytest -q"""
import json
import re
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtpd
from conftest import tiny_batch, tiny_detector
from models import fpn_features


def examples():
    return [textwrap.dedent(b) for b in re.findall(r"\n\n((?:    .*\n|\n)+)", mtpd.__doc__)
            if b.startswith("    import")]


def test_mtpd_imports_torch_and_the_standard_library_only():
    imports = re.findall(r"^(?:import|from) (\w+)", open(mtpd.__file__).read(), re.M)
    assert set(imports) <= {"contextlib", "math", "torch"} and len(open(mtpd.__file__).readlines()) <= 400


@pytest.mark.parametrize("which", [0, 1])
def test_the_docstring_examples_run_as_written_and_train_the_student(which):
    """0: torchvision's RetinaNet, a 0.5x student and two teachers: costs, BGS, resizing adapters, two
    stages. 1: a detector of one's own without a transform (a neck returning a list, no sizes): 1x1-conv
    adapters 64 -> 128 with a 2x resize. Either way no warning, the student's weights move, hooks go."""
    torch.manual_seed(0)
    scope = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(examples()[which], "mtpd.__doc__", "exec"), scope)
    student, adapters, losses = scope["student"], scope["adapters"], scope["losses"]
    assert all(torch.isfinite(v) for v in losses.values()) and losses["distill"] > 0
    if which == 0:
        assert scope["order"][-1] == "B" and set(scope["order"]) <= {"A", "B"}  # B has the best AP
        assert set(scope["cost"]) == {"student", "A", "B"}
        assert sorted(map(int, adapters)) == [8, 16, 32, 64, 128]
        assert isinstance(adapters["8"].proj, nn.Identity)
        torch.manual_seed(0)
        fresh = scope["retinanet_resnet50_fpn"](min_size=64, **scope["kw"]).state_dict()
        assert not student.backbone._forward_hooks and not student.transform._forward_hooks
    else:
        assert sorted(map(int, adapters)) == [2, 4, 8] and adapters["8"].proj.weight.shape == (128, 64, 1, 1)
        assert scope["feats"].sizes is None
        torch.manual_seed(0)
        fresh = scope["Net"](64, 64).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in student.named_parameters())


# 1. Feature capture -----------------------------------------------------------------------------------------
def test_stride_keyed_keys_levels_by_size_in_either_order():
    sizes = [8, 4, 2, 1, 1]  # P3-P7 of a 64-px input: P6 and P7 are both 1x1
    levels = [torch.full((1, 1, h, h), float(i)) for i, h in enumerate(sizes)]
    fine = mtpd.stride_keyed((64, 64), levels)
    coarse = mtpd.stride_keyed((64, 64), levels[::-1])
    assert list(fine) == [8, 16, 32, 64, 128] and sorted(coarse) == [8, 16, 32, 64, 128]
    assert all(torch.equal(fine[s], coarse[s]) for s in (8, 16, 32)) and fine[8][0, 0, 0, 0] == 0
    assert list(mtpd.stride_keyed((100, 100), [torch.zeros(1, 1, h, h) for h in (13, 7, 4)])) == [8, 16, 32]
    assert list(mtpd.stride_keyed((800, 1216), {"0": torch.zeros(1, 1, 200, 304)})) == [4]
    with pytest.raises(ValueError, match="neither finest nor coarsest first"):
        mtpd.stride_keyed((64, 64), [levels[1], levels[0], levels[2]])
    with pytest.raises(TypeError, match=r"wrap a single map as \{'0': x\}"):
        mtpd.stride_keyed((64, 64), torch.zeros(2, 3, 8, 8))


class ListNeck(nn.Module):
    """A neck that takes the backbone's maps as a list [C3, C4, C5] (strides 8, 16, 32)."""

    def forward(self, feats):
        return [f * 2 for f in feats]


class ArgsNeck(nn.Module):
    """A neck that takes C3, C4, C5 as separate arguments."""

    def forward(self, c3, c4, c5):
        return [c3, c4, c5]


def test_capture_features_refuses_a_neck_not_given_the_images_or_keys_it_by_input_hw():
    c = [torch.zeros(1, 4, 64 // s, 64 // s) for s in (8, 16, 32)]
    for neck, call in ((ListNeck(), lambda n: n(c)), (ArgsNeck(), lambda n: n(*c))):
        store, hooks = mtpd.capture_features(neck)
        with pytest.raises(ValueError, match="is not the image batch") as e:
            call(neck)  # strides 1, 2, 4 from the first map would be wrong: refused
        assert "\n" not in str(e.value) and "input_hw=" in str(e.value)
        hooks.remove()
        store, hooks = mtpd.capture_features(neck, input_hw=(64, 64))
        call(neck)
        hooks.remove()
        assert list(store) == [8, 16, 32] and store.sizes is None


def test_capture_features_with_a_transform_reads_the_padded_size_and_the_image_sizes():
    model = tiny_detector(scale=0.5).train()
    store, hooks = mtpd.capture_features(model.backbone, model.transform)
    images, targets = tiny_batch()
    model([images[0], images[1][:, :48]], targets)
    hooks.remove()
    assert sorted(store) == [8, 16, 32, 64, 128] and store.sizes == [(32, 32), (24, 32)]
    assert not model.backbone._forward_hooks


def test_eval_mode_restores_every_submodules_mode_also_on_error():
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.Sequential(nn.BatchNorm2d(1))).train()
    net[2].eval()
    before = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with mtpd.eval_mode(net):
            assert not any(m.training for m in net.modules())
            net(torch.randn(2, 1, 3, 3))
            raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == before and net[1].num_batches_tracked == 0


# 2. Adapters ------------------------------------------------------------------------------------------------
class Given(nn.Module):
    """A stand-in model whose features are given."""

    def __init__(self, feats):
        super().__init__()
        self.feats = feats


def test_adapters_pair_by_stride_and_choose_identity_conv_and_resize():
    s = {8: torch.randn(2, 4, 4, 4), 16: torch.randn(2, 4, 2, 2)}
    t = {8: torch.randn(2, 6, 8, 8), 16: torch.randn(2, 6, 4, 4), 4: torch.randn(2, 6, 16, 16)}
    given = lambda model, images: model.feats  # noqa: E731
    ad = mtpd.make_adapters(Given(s), Given(t), None, given)
    assert sorted(ad) == ["16", "8"] and isinstance(ad["8"].proj, nn.Conv2d)  # stride 4: no student level
    y, mask = ad["8"](s[8], (8, 8))
    assert y.shape == (2, 6, 8, 8) and mask is None
    same = mtpd.make_adapters(Given(s), Given(s), None, given)
    assert isinstance(same["8"].proj, nn.Identity) and torch.equal(same["8"](s[8], (4, 4))[0], s[8])
    with pytest.raises(ValueError, match="no common stride"):
        mtpd.make_adapters(Given(s), Given({32: t[8]}), None, given)


def test_alignment_by_the_images_extent_masks_the_teachers_padding():
    """Image 2 (40x32 px) in a batch padded to 48x48: at stride 8 its content is 5x4 cells of the 6x6 map;
    the teacher at 2x: 10x8 of 12x12. Those cells go onto those, the rest is masked out."""
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6)
    y, mask = mtpd.align(x, (12, 12), 8, [(48, 48), (40, 32)], [(96, 96), (80, 64)])
    assert y.shape == (2, 1, 12, 12) and mask[1, 0].sum() == 80 and mask[0, 0].sum() == 144
    assert torch.allclose(y[1:, :, :10, :8], F.interpolate(x[1:, :, :5, :4], (10, 8), mode="bilinear"))
    assert y[1, :, 10:].abs().sum() == 0 and y[1, :, :, 8:].abs().sum() == 0
    with pytest.raises(ValueError, match="some features carry the images' sizes"):
        mtpd.align(x, (12, 12), 8, None, [(96, 96), (80, 64)])


# 3. Feature loss --------------------------------------------------------------------------------------------
def identity_adapters(*strides):
    return nn.ModuleDict({str(s): mtpd.Adapter(1, 1) for s in strides})


def test_feature_loss_hand_computed_normalised_and_plain():
    """Level 8: F_T = [1, 2, 3, 4] on 1 channel, student 0: SSE 30, variance about the mean 2.5: 5; level
    16: F_T = [0, 2]: SSE 4, variance 2. Normalised: (30 + 4) / (5 + 2); plain: (30 + 4) / 6 values."""
    t = {8: torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2),
         16: torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)}
    z = {s: torch.zeros_like(v) for s, v in t.items()}
    levels = {}
    assert mtpd.feature_loss(z, t, identity_adapters(8, 16), levels=levels).item() == pytest.approx(34 / 7)
    assert levels[8].item() == pytest.approx(30 / 7) and levels[16].item() == pytest.approx(4 / 7)
    assert mtpd.feature_loss(z, t, identity_adapters(8, 16), normalize=False).item() == pytest.approx(34 / 6)
    assert mtpd.feature_loss(t, t, identity_adapters(8, 16)).item() == 0.0


def test_a_student_of_the_teachers_per_channel_means_scores_one():
    """With channel offsets (an FPN conv's bias) the variance about one mean over all channels would make
    this student score far below 1: each channel about its own mean gives exactly 1."""
    torch.manual_seed(0)
    ft = torch.randn(2, 4, 8, 8) + 3 * torch.randn(4)[:, None, None]
    fs = ft.mean((0, 2, 3), keepdim=True).expand_as(ft)
    ad = nn.ModuleDict({"8": mtpd.Adapter(4, 4)})
    assert mtpd.feature_loss({8: fs}, {8: ft}, ad).item() == pytest.approx(1.0, abs=1e-6)
    single = ((fs - ft) ** 2).sum() / ((ft - ft.mean()) ** 2).sum()  # one mean over every channel
    assert single < 0.5
    assert mtpd.feature_loss({8: fs}, {8: ft}, ad, normalize=False).item() == pytest.approx(
        float(((fs - ft) ** 2).mean()), rel=1e-6)


def test_padding_changes_neither_the_loss_nor_the_cost():
    torch.manual_seed(0)
    fs = mtpd.Levels({8: torch.randn(2, 4, 6, 6)}, sizes=[(48, 48), (40, 32)])
    ft = mtpd.Levels({8: torch.randn(2, 4, 6, 6)}, sizes=[(48, 48), (40, 32)])
    other = mtpd.Levels({8: ft[8].clone()}, ft.sizes)
    other[8][1, :, 5:, :], other[8][1, :, :, 4:] = 100.0, -100.0  # image 2's padding
    ad = nn.ModuleDict({"8": mtpd.Adapter(4, 4)})
    for normalize in (True, False):
        assert mtpd.feature_loss(fs, ft, ad, normalize=normalize).item() == pytest.approx(
            mtpd.feature_loss(fs, other, ad, normalize=normalize).item(), rel=1e-6)
    unsized = mtpd.feature_loss(dict(fs), dict(other), ad)  # without sizes the padding counts
    assert unsized != pytest.approx(mtpd.feature_loss(dict(fs), dict(ft), ad))
    costs = [mtpd.adaptation_costs([(sp, {"s": fs, "t": t}) for sp in ("fit", "held")]) for t in (ft, other)]
    assert costs[0]["s"]["t"] == pytest.approx(costs[1]["s"]["t"], rel=1e-9)


def test_no_warning_without_sizes_and_one_line_errors_for_sizes_on_one_side():
    lo, hi = {8: torch.randn(2, 4, 4, 4)}, {8: torch.randn(2, 4, 8, 8)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a detector that does not pad: nothing to act on, nothing said
        mtpd.feature_loss(lo, hi, nn.ModuleDict({"8": mtpd.Adapter(4, 4)}))
        mtpd.adaptation_costs([(sp, {"lo": lo, "hi": hi}) for sp in ("fit", "held")])
    sized = mtpd.Levels(hi, [(64, 64), (64, 64)])
    for run in (lambda: mtpd.feature_loss(lo, sized, nn.ModuleDict({"8": mtpd.Adapter(4, 4)})),
                lambda: mtpd.adaptation_costs([(sp, {"lo": lo, "hi": sized}) for sp in ("fit", "held")])):
        with pytest.raises(ValueError, match="some features carry the images' sizes") as e:
            run()
        assert "\n" not in str(e.value)


def test_distill_losses_refuses_a_student_in_eval_mode_and_never_trains_the_teacher():
    torch.manual_seed(0)
    student, teacher = tiny_detector(scale=0.5), mtpd.freeze(tiny_detector("retinanet_r34"))
    images, targets = tiny_batch()
    adapters = [mtpd.make_adapters(student, teacher, images, fpn_features)]
    feats, hooks = mtpd.capture_features(student.backbone, student.transform)
    with pytest.raises(ValueError, match=r"eval mode.*call student.train\(\)") as e:
        mtpd.distill_losses(student.eval(), images, targets, feats, [teacher], adapters, fpn_features)
    assert "\n" not in str(e.value)
    losses = mtpd.distill_losses(student.train(), images, targets, feats, [teacher], adapters, fpn_features,
                                 lam=2.0)
    hooks.remove()
    assert set(losses) == {"classification", "bbox_regression", "distill"} and losses["distill"] > 0
    losses["distill"].backward()  # the feature term alone moves the student's neck
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


# 4. Adaptation cost ---------------------------------------------------------------------------------------
def feats(seed, c=6, n=4, hw=8):
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


def test_cost_equals_direct_least_squares_and_an_adapter_started_there_starts_at_the_cost():
    """The cost fits W on 'fit' and scores it on 'held'; a 1x1-conv adapter set to that W, on the held-out
    batch, gives a feature loss equal to the cost: one normalisation."""
    fit_a, fit_b, held_a, held_b = feats(1), feats(2, c=3), feats(3), feats(4, c=3)
    bias = torch.tensor([1.0, -2, 3])[:, None, None]
    fit_b = fit_b + torch.einsum("dc,nchw->ndhw", torch.randn(3, 6), fit_a) + bias
    held_b = held_b + torch.einsum("dc,nchw->ndhw", torch.randn(3, 6), held_a)
    cost = mtpd.adaptation_costs([("fit", {"A": {8: fit_a}, "B": {8: fit_b}}),
                                  ("held", {"A": {8: held_a}, "B": {8: held_b}})], ridge=0.0)
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()  # noqa: E731
    x = torch.cat([rows(fit_a), torch.ones(len(rows(fit_a)), 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(x, rows(fit_b)).solution  # [7, 3]
    xh, yh = torch.cat([rows(held_a), torch.ones(len(rows(held_a)), 1, dtype=torch.float64)], 1), rows(held_b)
    by_hand = ((xh @ w - yh) ** 2).sum() / ((yh - yh.mean(0)) ** 2).sum()  # each channel about its mean
    assert cost["A"]["B"] == pytest.approx(by_hand.item())
    adapter = nn.ModuleDict({"8": mtpd.Adapter(6, 3)})
    with torch.no_grad():
        adapter["8"].proj.weight.copy_(w[:-1].T.reshape(3, 6, 1, 1))
        adapter["8"].proj.bias.copy_(w[-1])
    start = mtpd.feature_loss({8: held_a}, {8: held_b}, adapter).item()
    assert start == pytest.approx(cost["A"]["B"], rel=1e-5)


def test_cost_zero_for_an_affine_map_and_large_when_rank_is_lost():
    w, b = torch.randn(6, 6, generator=torch.Generator().manual_seed(9)), torch.randn(6, 1, 1)
    proj = torch.zeros(6, 6)
    proj[:2, :2] = torch.eye(2)  # C keeps 2 of A's 6 directions
    batches = [(sp, {"A": {8: a}, "B": {8: torch.einsum("dc,nchw->ndhw", w, a) + b},
                     "C": {8: torch.einsum("dc,nchw->ndhw", proj, a)}})
               for sp, a in (("fit", feats(0)), ("fit", feats(1)), ("held", feats(2)))]
    cost = mtpd.adaptation_costs(batches, ridge=1e-6)
    assert cost["A"]["B"] < 1e-4 and cost["B"]["A"] < 1e-4 and cost["A"]["C"] < 1e-4
    assert cost["C"]["A"] > 0.5  # asymmetric: A cannot be recovered from its projection


def test_cost_resizes_across_resolutions_and_needs_a_held_out_split():
    a = feats(5, hw=4)
    up = F.interpolate(a, size=(8, 8), mode="bilinear", align_corners=False)
    cost = mtpd.adaptation_costs([(sp, {"lo": {8: a}, "hi": {8: up}}) for sp in ("fit", "held")], ridge=1e-8)
    assert cost["lo"]["hi"] < 1e-6 < cost["hi"]["lo"]
    with pytest.raises(ValueError, match="held-out"):
        mtpd.adaptation_costs([("fit", {"A": {8: feats(1)}, "B": {8: feats(2)}})])


# 5. Backward Greedy Selection -------------------------------------------------------------------------------
COST = {"S": {"T1": 0.5, "T2": 0.8, "T3": 0.9}, "T1": {"S": 0.1, "T2": 0.3, "T3": 0.6},
        "T2": {"S": 0.1, "T1": 0.2, "T3": 0.4}, "T3": {"S": 0.1, "T1": 0.2, "T2": 0.1}}
AP = {"T1": 0.30, "T2": 0.35, "T3": 0.40}


def test_bgs_builds_backwards_from_the_best_teacher_up_to_k():
    assert mtpd.backward_greedy_selection(COST, "S", AP, k=3) == ["T1", "T2", "T3"]
    assert mtpd.backward_greedy_selection(COST, "S", AP, k=2) == ["T2", "T3"]
    assert mtpd.backward_greedy_selection(COST, "S", AP, k=1) == ["T3"]
    with pytest.raises(ValueError):
        mtpd.backward_greedy_selection(COST, "S", AP, k=0)


def test_bgs_stops_when_the_student_is_closer_than_any_bridge_and_takes_the_cheapest_bridge():
    cost = json.loads(json.dumps(COST))
    cost["S"]["T2"] = 0.25  # S -> T2 beats the only bridge T1 -> T2 (0.3)
    assert mtpd.backward_greedy_selection(cost, "S", AP, k=3) == ["T2", "T3"]
    cost["S"]["T3"] = 0.05
    assert mtpd.backward_greedy_selection(cost, "S", AP, k=3) == ["T3"]
    cost = json.loads(json.dumps(COST))
    cost["T1"]["T3"], cost["T2"]["T3"] = 0.05, 0.3  # T1 is the cheaper bridge despite its lower AP
    assert mtpd.backward_greedy_selection(cost, "S", AP, k=2) == ["T1", "T3"]
