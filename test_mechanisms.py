"""Tests of mechanisms.py against values computed by hand on tiny tensors (CPU, well under a second each),
then a mechanism in engine's distillation step (about a second) and in `train.py distill` (slow: seconds).
Run: python -m pytest -q test_mechanisms.py"""
import json
import math

import pytest
import torch
from torch import nn

import engine
import mechanisms as M
import train
from conftest import cli, tiny_detector


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny maps gain nothing from a second thread, and on a busy machine threads that wait on each other
    made this file ten times slower (70 s instead of 7 on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(shape=(2, 3, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


# ---------------------------------------------------------------------------------------------------------
# CWD (the L2 is mtpd.feature_loss: test_mtpd.py)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_cwd_equals_kl_computed_by_hand(tau):
    fs, ft = _pair()
    n, c, h, w = fs.shape
    total = 0.0
    for i in range(n):
        for j in range(c):
            s = [v / tau for v in fs[i, j].flatten().tolist()]
            t = [v / tau for v in ft[i, j].flatten().tolist()]
            zs, zt = sum(math.exp(v) for v in s), sum(math.exp(v) for v in t)
            ps, pt = [math.exp(v) / zs for v in s], [math.exp(v) / zt for v in t]
            total += sum(q * math.log(q / p) for p, q in zip(ps, pt))  # KL(p_T || p_S)
    expected = 5.0 * tau ** 2 * total / (n * c)
    assert M.CWD(c, tau=tau, weight=5.0)(fs, ft).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_is_zero_when_student_equals_teacher():
    fs, _ = _pair()
    assert M.CWD(3)(fs, fs.clone()).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# FGD: masks, then the whole loss
# ---------------------------------------------------------------------------------------------------------
def test_fgd_mask_of_a_known_box():
    # x 8..24 px -> cells floor(1)..ceil(3) = columns 1..3; y 8..40 -> rows 1..5: 5 x 3 = 15 cells.
    fg, bg = M.fgd_masks([torch.tensor([[8.0, 8.0, 24.0, 40.0]])], 8, 8, 8)
    expected = torch.zeros(8, 8)
    expected[1:6, 1:4] = 1 / 15  # rows are y, columns are x
    assert fg.shape == bg.shape == (1, 8, 8)
    assert torch.allclose(fg[0], expected)
    assert torch.allclose(bg[0], (expected == 0).float() / 49)  # 64 - 15 background cells


def test_fgd_mask_scales_boxes_by_the_stride():
    # The same box at stride 16: x 0.5..1.5 -> columns 0..2, y 0.5..2.5 -> rows 0..3 (12 cells).
    fg, _ = M.fgd_masks([torch.tensor([[8.0, 8.0, 24.0, 40.0]])], 16, 4, 4)
    expected = torch.zeros(4, 4)
    expected[0:4, 0:3] = 1 / 12
    assert torch.allclose(fg[0], expected)


def test_fgd_mask_overlap_takes_the_max_and_empty_image():
    big, small = [8.0, 8.0, 24.0, 40.0], [16.0, 16.0, 24.0, 24.0]  # small: rows 2..3, columns 2..3
    fg, bg = M.fgd_masks([torch.tensor([big, small]), torch.zeros(0, 4)], 8, 8, 8)
    expected = torch.zeros(8, 8)
    expected[1:6, 1:4] = 1 / 15
    expected[2:4, 2:4] = 1 / 4  # the smaller box's larger value wins where they overlap
    assert torch.allclose(fg[0], expected)
    assert torch.allclose(bg[0], (expected == 0).float() / 49)
    assert torch.equal(fg[1], torch.zeros(8, 8))  # an image without boxes: all background
    assert torch.allclose(bg[1], torch.full((8, 8), 1 / 64))


def test_fgd_loss_matches_the_formula_by_hand():
    fs, ft = _pair((2, 4, 4, 4), seed=1)
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 4.0]]), torch.zeros(0, 4)]
    temp, (a, b, g, l) = 0.5, (1e-3, 5e-4, 5e-4, 5e-6)

    def attention(x):  # explicit exponentials rather than softmax
        sp = torch.exp(x.abs().mean(1) / temp)  # [N, H, W]
        ch = torch.exp(x.abs().mean((2, 3)) / temp)  # [N, C]
        return 16 * sp / sp.sum((1, 2), keepdim=True), 4 * ch / ch.sum(1, keepdim=True)

    s_t, c_t = attention(ft)
    s_s, c_s = attention(fs)
    fg = torch.zeros(2, 4, 4)
    fg[0, 0:2, 0:3] = 1 / 6  # x 0..8 / 4 -> columns 0..2, y 0..4 / 4 -> rows 0..1
    bg = (fg == 0).float() / (fg == 0).float().sum((1, 2), keepdim=True)

    def masked(x, m):  # the original's form: both maps times sqrt(mask * attentions), then summed MSE
        return x * torch.sqrt(s_t[:, None]) * torch.sqrt(c_t[:, :, None, None]) * torch.sqrt(m[:, None])

    fg_loss = ((masked(fs, fg) - masked(ft, fg)) ** 2).sum() / 2
    bg_loss = ((masked(fs, bg) - masked(ft, bg)) ** 2).sum() / 2
    att_loss = (c_s - c_t).abs().sum() / 2 + (s_s - s_t).abs().sum() / 2
    global_loss = ((fs - ft) ** 2).sum() / 2  # both GcBlocks are the identity at init (last conv zero)
    expected = a * fg_loss + b * bg_loss + g * att_loss + l * global_loss
    got = M.FGD(4, temp=temp, alpha=a, beta=b, gamma=g, lam=l, weight=3.0)(fs, ft, boxes, 4)
    assert got.item() == pytest.approx(3.0 * expected.item(), rel=1e-5)


def test_fgd_needs_boxes_and_every_mechanism_same_shapes():
    fs, ft = _pair()
    with pytest.raises(ValueError, match="boxes"):
        M.FGD(3)(fs, ft)
    with pytest.raises(ValueError, match="Adapter"):
        M.CWD(3)(fs[:, :, :2], ft)


# ---------------------------------------------------------------------------------------------------------
# MGD and PKD
# ---------------------------------------------------------------------------------------------------------
def test_mgd_without_mask_and_identity_generator_is_summed_l2():
    fs, ft = _pair()
    mgd = M.MGD(3, alpha=2e-5, mask_ratio=0.0, weight=2.0)
    mgd.generation = nn.Identity()
    sq = sum((x - y) ** 2 for x, y in zip(fs.flatten().tolist(), ft.flatten().tolist()))
    expected = 2.0 * 2e-5 * sq / 2  # weight * alpha * sum / N
    assert mgd(fs, ft).item() == pytest.approx(expected, rel=1e-5)


def test_mgd_mask_ratio_shared_by_channels_and_seeded():
    # fs = 1, ft = 0, G = identity: the loss counts the kept positions (times C), so it reads the mask.
    n, c, h, w = 4, 3, 32, 32
    mgd = M.MGD(c, alpha=1.0, mask_ratio=0.65)
    mgd.generation = nn.Identity()
    fs, ft = torch.ones(n, c, h, w), torch.zeros(n, c, h, w)
    torch.manual_seed(0)
    kept = mgd(fs, ft).item() * n / c  # kept positions, summed over the batch
    assert kept == int(kept)  # a whole number: every channel of a position is kept or dropped together
    assert kept / (n * h * w) == pytest.approx(0.35, abs=0.03)
    torch.manual_seed(0)
    assert mgd(fs, ft).item() * n / c == kept


def test_pkd_ignores_a_per_channel_affine_change_of_the_student():
    fs, ft = _pair((2, 3, 4, 4))
    scale = torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1)
    shift = torch.tensor([-1.0, 3.0, 10.0]).view(1, 3, 1, 1)
    pkd = M.PKD(3)
    assert pkd(scale * fs + shift, ft).item() == pytest.approx(pkd(fs, ft).item(), abs=1e-5)


def test_pkd_is_one_minus_pearson_r():
    # With population std, z-scores have mean(z^2) = 1, so mean((zs - zt)^2) / 2 = (1 + 1 - 2 mean(zs zt)) / 2
    # = 1 - r: the loss is weight * mean over channels of (1 - r_c).
    fs, ft = _pair((2, 3, 4, 4))
    rs = []
    for c in range(3):
        x, y = fs[:, c].flatten().tolist(), ft[:, c].flatten().tolist()
        mx, my = sum(x) / len(x), sum(y) / len(y)
        cov = sum((u - mx) * (v - my) for u, v in zip(x, y)) / len(x)
        sx = math.sqrt(sum((u - mx) ** 2 for u in x) / len(x))
        sy = math.sqrt(sum((v - my) ** 2 for v in y) / len(y))
        rs.append(cov / (sx * sy))
    expected = 10.0 * sum(1 - r for r in rs) / 3
    assert M.PKD(3, weight=10.0)(fs, ft).item() == pytest.approx(expected, abs=1e-4)
    assert M.PKD(3)(ft, ft.clone()).item() == pytest.approx(0.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------
# All four: gradients, precision, construction
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(M.MECHANISMS))
def test_gradient_reaches_student_and_mechanism_never_teacher(name):
    torch.manual_seed(0)
    teacher = nn.Conv2d(3, 8, 3, padding=1)
    ft = teacher(torch.randn(2, 3, 8, 8))  # no torch.no_grad(): ft carries a graph the mechanism must cut
    fs = torch.randn(2, 8, 8, 8, requires_grad=True)
    mech = M.make(name, 8)
    loss = mech(fs, ft, [torch.tensor([[8.0, 8.0, 40.0, 24.0]]), torch.zeros(0, 4)], 8)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    params = dict(mech.named_parameters())
    if name in ("cwd", "pkd"):
        assert not params
    elif name == "mgd":
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    else:  # fgd: the GcBlocks' last convs start at zero, so only they get gradient at first
        for gc in (mech.gc_student, mech.gc_teacher):
            assert gc.transform[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(M.MECHANISMS))
def test_float32_under_bf16_autocast(name):
    fs, ft = (x.bfloat16() for x in _pair((2, 4, 8, 8)))  # bf16 maps, as a bf16 forward hands them over
    if name == "fgd":  # F_S = F_T: only the two GcBlocks' difference is left, so their convs must be float32
        ft = fs
    mech = M.make(name, 4, weight=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # nonzero everywhere, so FGD's GcBlocks are no longer the identity
        for p in mech.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 24.0]])] * 2
    torch.manual_seed(0)
    ref = mech(fs.float(), ft.float(), boxes, 4)
    torch.manual_seed(0)
    with torch.autocast("cpu", torch.bfloat16):
        got = mech(fs, ft, boxes, 4)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)  # no op (conv included) ran in bf16


def test_class_defaults_are_published_and_make_applies_the_benchmark_weight():
    # The published RetinaNet settings, as the classes' docstrings give them (the papers, the authors' code)
    published = {"cwd": dict(tau=1.0, weight=5.0),
                 "fgd": dict(temp=0.5, alpha=1e-3, beta=5e-4, gamma=5e-4, lam=5e-6, weight=1.0),
                 "mgd": dict(alpha=2e-5, mask_ratio=0.65, weight=1.0),
                 "pkd": dict(weight=10.0)}
    assert set(published) == set(M.MECHANISMS) == set(M.BENCHMARK) == set(M.NAMES) - {"l2"}
    for name, settings in published.items():
        pub, bench = M.MECHANISMS[name](8), M.make(name, 8)
        assert type(bench) is M.MECHANISMS[name]
        for key, value in settings.items():
            assert getattr(pub, key) == value, (name, key)
            assert getattr(bench, key) == (M.BENCHMARK[name] if key == "weight" else value), (name, key)
        assert bench.weight != pub.weight  # BENCHMARK retunes the weight only
    mgd = M.make("mgd", 8, mask_ratio=0.45, alpha=5e-7)  # overrides on top, the weight still BENCHMARK's
    assert (mgd.mask_ratio, mgd.alpha, mgd.weight) == (0.45, 5e-7, M.BENCHMARK["mgd"])
    assert M.make("pkd", 8, weight=3.0).weight == 3.0
    assert M.make("fgd", 6).gc_student.context.in_channels == 6  # `channels` sizes the learnable parts
    for name in ("at", "l2"):  # the L2 is mtpd.feature_loss, no module
        with pytest.raises(ValueError, match="unknown mechanism"):
            M.make(name, 8)


# ---------------------------------------------------------------------------------------------------------
# In the training engine and the CLI
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fgd", "mgd"])
def test_distillation_step_trains_student_adapters_and_mechanism_not_teacher(name, shapes):
    """engine.setup makes one mechanism per adapter (the teacher's width) and optimises it with the student;
    engine.step's 'distill' is the sum of the mechanisms' losses, each of which reaches the student; FGD
    gets the boxes in the teacher's input frame (a 2x teacher: twice the data's), the teacher never moves."""
    cpu = torch.device("cpu")
    loader = engine.loaders(shapes[0], 2, 0, False, cpu)[0]
    student = tiny_detector(scale=0.5)  # 32-px input, 16 channels
    teacher = tiny_detector(scale=2.0, fpn_channels=32)  # 128-px input: 1x1-conv and resizing adapters
    recipe = dict(train.RECIPE, precision="fp32", lam=1.0, normalize=True, resume=False)
    st = engine.setup(student, loader, 1, cpu, 0, recipe, [teacher], name)
    (adapters,), (mechs,) = st.adapters, st.mechs
    assert set(mechs) == set(adapters) == {"8", "16", "32", "64", "128"}
    assert all(type(m) is M.MECHANISMS[name] and m.weight == M.BENCHMARK[name] for m in mechs.values())
    assert st.boxes is (M.input_boxes if name == "fgd" else None)
    in_opt = {id(p) for p in st.params}
    trained = [*adapters.parameters(), *mechs.parameters()]
    assert len(trained) > len(list(adapters.parameters())) > 0 and all(id(p) in in_opt for p in trained)
    assert not any(id(p) in in_opt for p in teacher.parameters())

    calls = []

    def spy(mech, args, out):  # args: (phi(F_S), F_T, boxes, stride); the loss's gradient in a student conv
        g, = torch.autograd.grad(out, student.backbone.body.conv1.weight, retain_graph=True)
        calls.append(dict(fs=args[0].shape, ft=args[1].shape, boxes=args[2], stride=args[3], loss=out.item(),
                          grad=g.abs().sum().item()))

    for m in mechs.values():
        m.register_forward_hook(spy)
    images, targets = next(iter(loader))
    before = {k: v.clone() for k, v in [*adapters.state_dict().items(), *mechs.state_dict().items()]}
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses, levels = engine.step(st, images, targets, recipe)
    st.hooks.remove()

    assert sorted(c["stride"] for c in calls) == [8, 16, 32, 64, 128]
    assert all(c["fs"] == c["ft"] and c["ft"][1] == 32 for c in calls)  # adapted onto the teacher's maps
    assert losses["distill"].item() == pytest.approx(sum(c["loss"] for c in calls), rel=1e-5)
    assert all(c["loss"] > 0 for c in calls)
    assert {s: v.item() for s, v in levels.items()} == pytest.approx({c["stride"]: c["loss"] for c in calls})
    assert sum(c["grad"] for c in calls) > 0  # MGD may mask a 1x1 level out entirely, FGD never
    assert name == "mgd" or all(c["grad"] > 0 for c in calls)
    after = {**adapters.state_dict(), **mechs.state_dict()}
    assert not torch.equal(after["8.proj.weight"], before["8.proj.weight"])  # the adapter trained
    if name == "fgd":
        assert all(torch.equal(c["boxes"][i], 2 * t["boxes"]) for c in calls for i, t in enumerate(targets))
        assert sum(len(t["boxes"]) for t in targets) > 0
        last = [k for k in before if k.endswith("transform.3.weight")]  # 2 GcBlocks' last convs a level:
        assert len(last) == 10 and all(not before[k].any() and after[k].any() for k in last)  # 0, trained
    else:
        assert all(c["boxes"] is None for c in calls)
        gen = [k for k in before if k.startswith("8.generation")]
        assert len(gen) == 4 and all(not torch.equal(after[k], before[k]) for k in gen)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


@pytest.mark.slow
def test_distill_cli_mixes_mechanisms_per_stage_and_exports_a_plain_student(zoo, tmp_path, capsys):
    """--keep-order with one mechanism per stage: each stage records its own; the export is stage 2's
    student alone; resuming with another mechanism, or more mechanisms than stages, stops with code 2."""
    base, root = zoo
    out = tmp_path / "d"
    common = ["distill", "--student", base / "s.pt", "--teachers", base / "t1.pt", base / "t2.pt",
              "--data", root, "--keep-order", "--steps", "2", "--batch", "2"]
    train.main([*common, "--mechanism", "fgd", "pkd", "--out", out])  # in-process: a fresh one costs 5 s more
    assert "order: t1 -> t2" in capsys.readouterr().out
    assert json.load(open(out / "order.json"))["order"] == ["t1", "t2"]
    made = [engine.read(out / f"stage{i}.pt")["metrics"]["made"] for i in (1, 2)]
    assert [(m["teachers"], m["mechanism"]) for m in made] == [(["t1"], "fgd"), (["t2"], "pkd")]
    sd, spec = torch.load(out / "student.pt", weights_only=True), json.load(open(out / "student_spec.json"))
    assert set(sd) == set(torch.load(base / "s.pt", weights_only=True)["model"])  # no adapter or GcBlock
    engine.build(spec).load_state_dict(sd)  # strict
    last = engine.read(out / "stage2.pt")["model"]
    assert all(torch.equal(v, last[k]) for k, v in sd.items())
    assert not all(torch.equal(v, sd[k]) for k, v in engine.read(base / "s.pt")["model"].items())
    code, err = cli(capsys, *common, "--mechanism", "cwd", "--resume", "--out", out)  # resuming, another loss
    assert code == 2 and "stage1.pt was made otherwise" in err and "'mechanism': 'cwd'" in err
    code, err = cli(capsys, *common, "--mechanism", "fgd", "pkd", "cwd", "--out", tmp_path / "e")
    assert code == 2 and "one per teacher" in err and not (tmp_path / "e").exists()
