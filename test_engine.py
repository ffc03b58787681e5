"""Tests of the training engine: precision by the machine, bf16/fp16 paths on a CPU, the feature cache,
torchrun/DDP, resume after a kill,
atomic writes, safe loading and one-line errors. Run: python -m pytest -q"""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import engine
import mtpd
import train
from conftest import HERE, cli, run_cli, tiny_batch, tiny_detector
from models import fpn_features


def test_bf16_precision_channels_last_trains(shapes):
    """--precision bf16 (bf16 autocast for student and teacher, channels_last, fused AdamW, cached teacher
    features) trains on a CPU, stays finite, and anchors stay float32 under autocast."""
    root, _ = shapes
    loader, _ = engine.loaders(root, 4, seed=1, masks=False)
    torch.manual_seed(0)
    model, teacher = tiny_detector(size=64), tiny_detector("retinanet_r34", size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine.train_loop(model, loader, 2, torch.device("cpu"), 0, dict(train.RECIPE, lr=1e-3, precision="bf16"),
                      [teacher])
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, _ = tiny_batch()
    with torch.autocast("cpu", torch.bfloat16):
        feats = list(model.backbone(model.transform(images)[0].tensors).values())
        anchors = model.anchor_generator(model.transform(images)[0], feats)
    assert feats[0].dtype == torch.bfloat16 and anchors[0].dtype == torch.float32


def test_p6_p7_stay_float32_under_bf16_so_1x1_maps_get_finite_gradients():
    """At 64 px a RetinaNet's P5 is 2x2 and P6/P7 1x1, where the CPU's bf16 convolution backward gave NaN
    weight gradients (6 of 150 steps measured): models.Float32P6P7 runs them in float32."""
    torch.manual_seed(0)
    model = tiny_detector(size=64)
    images, targets = tiny_batch()
    with torch.autocast("cpu", torch.bfloat16):
        feats = model.backbone(model.transform(images)[0].tensors)
        loss = sum(model(images, targets).values())
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert [f.dtype for f in feats.values()][-2:] == [torch.float32, torch.float32]
    assert feats["0"].dtype == torch.bfloat16
    loss.backward()
    p7 = model.backbone.fpn.extra_blocks.p7.weight.grad
    assert p7.dtype == torch.float32 and torch.isfinite(p7).all() and p7.abs().sum() > 0


def test_cached_teacher_features_give_the_uncached_loss(shapes):
    """The cache: every (image, flip) of the training set is stored once; in float32 the L2 loss of a
    distillation step from the cache equals the one from the teacher's forward (to float rounding), and
    under bf16 the cache (float16) matches the bf16 forward; the flipped entry is the teacher's map of the
    flipped image, not of the original."""
    root, _ = shapes
    ds = data.CocoDetection(root, "train", flip=True, masks=False)
    torch.manual_seed(0)
    student, teacher = tiny_detector(scale=0.5), mtpd.freeze(tiny_detector("retinanet_r34"))
    teacher.source = ("t.pt", 1)  # as engine.load tags a checkpoint: cached once per process
    pairs = [ds.load(i, flip=i % 2 == 1) for i in range(4)]
    images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    assert [t["flipped"] for t in targets] == [False, True, False, True]
    adapters, _ = engine.stage_adapters(student, [teacher], images)
    strides = [int(k) for k in adapters[0]]
    with torch.no_grad():
        exact = fpn_features(teacher, images)
    cache = engine.teacher_cache(teacher, ds, strides, torch.device("cpu"), "fp32", batch=5)
    per_image = sum(exact[s][0].numel() for s in strides)
    assert len(cache.maps) == 2 * len(ds) and cache.nbytes() == 2 * len(ds) * per_image * 4  # float32
    assert engine.teacher_cache(teacher, ds, strides, torch.device("cpu"), "fp32") is cache
    looked = cache.lookup(targets, torch.device("cpu"))
    for s in strides:
        assert looked[s].dtype == torch.float32 and looked[s].shape == exact[s].shape
        torch.testing.assert_close(looked[s], exact[s], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        unflipped = fpn_features(teacher, [images[1].flip(-1)])[8][0]
    assert not torch.allclose(looked[8][1], unflipped, atol=1e-2)
    # the path training takes: filled under bf16 autocast, against the bf16 forward of the batch
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        exact16 = fpn_features(teacher, images)
    low_cache = engine.teacher_cache(teacher, ds, strides, torch.device("cpu"), "bf16", batch=5)
    assert low_cache is not cache and low_cache.nbytes() == cache.nbytes() // 2  # float16
    low = low_cache.lookup(targets, torch.device("cpu"))
    for s in strides:
        torch.testing.assert_close(low[s], exact16[s].float(), rtol=2e-2, atol=2e-2)
    losses = {}
    for name, caches in (("forward", None), ("cache", [cache])):
        step = engine.Distilled(student, [teacher], adapters, 1.0, caches=caches)
        losses[name] = step(images, targets)["distill"].item()
        step.hook.remove()
    assert losses["cache"] == pytest.approx(losses["forward"], rel=1e-5) and losses["forward"] > 0


def test_auto_precision_follows_the_hardware(monkeypatch):
    """auto: bf16 where the CPU's oneDNN or the GPU computes it natively, fp16 (with a GradScaler) on a GPU
    with fp16 but no bf16 tensor cores, float32 otherwise, each with its reason; a forced precision runs
    as asked and says when it is emulated."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (False, True):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        precision, why = engine.choose_precision(cpu)
        assert precision == ("bf16" if native else "fp32")
        assert ("no native bfloat16" in why) != native and "AVX2" in why
        forced, why = engine.choose_precision(cpu, "bf16")
        assert forced == "bf16" and ("several times" in why) != native
    assert engine.choose_precision(cpu, "fp32")[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "GPU")
    for capability, want in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"),
                             ((6, 1), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        precision, why = engine.choose_precision(cuda)
        assert precision == want, (capability, why)
        assert f"sm_{capability[0]}{capability[1]}" in why
        assert ("GradScaler" in why) == (want == "fp16")
    with pytest.raises(engine.InputError, match="--precision must be one of"):
        engine.choose_precision(cpu, "fp8")


def test_cli_says_which_precision_runs_and_why(zoo, tmp_path, capsys, monkeypatch):
    """Every command that runs a model prints one line with the precision and the reason; with the CPU's
    native bf16 reported absent, auto runs float32."""
    base, root = zoo
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    train.main(["eval", "--ckpt", str(base / "s.pt"), "--data", root, "--batch", "4"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("precision")]
    assert (len(lines) == 1 and lines[0].startswith("precision fp32: float32:")
            and "no native bfloat16" in lines[0])
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    train.main(["cost", "--ckpts", str(base / "s.pt"), str(base / "t1.pt"), "--data", root, "--images", "4",
                "--out", str(tmp_path / "cost.json")])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("precision")]
    assert lines == [lines[0]] and lines[0].startswith("precision bf16: bf16 autocast:")


def test_fp16_with_grad_scaler_trains_and_resumes_its_scale(shapes, tmp_path):
    """--precision fp16 trains with a GradScaler (on a CPU here, as torch allows): finite weights that moved,
    and the resume state carries the scaler's state."""
    root, _ = shapes
    loader, _ = engine.loaders(root, 4, seed=1, masks=False)
    torch.manual_seed(0)
    model, teacher = tiny_detector(size=64), tiny_detector("retinanet_r34", size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = str(tmp_path / "state.pt")
    engine.train_loop(model, loader, 3, torch.device("cpu"), 0,
                      dict(train.RECIPE, lr=1e-3, precision="fp16", every=3), [teacher], state=state)
    after = model.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    scaler = torch.load(state, weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and "growth_factor" in scaler


def test_cache_is_refused_under_other_augmentations_and_keyed_by_the_input(shapes, capsys):
    """The cache stands in for a teacher's forward only when the flip is the only augmentation: another
    one is refused with one line; a teacher with another input transform gets its own cache; a shard
    of the images caches only those images."""
    root, _ = shapes
    ds = data.CocoDetection(root, "train", flip=True, masks=False)
    teacher = mtpd.freeze(tiny_detector("retinanet_r34"))
    teacher.source = ("key-test.pt", 1)
    cpu = torch.device("cpu")
    ds.augmentations = ("hflip", "color_jitter")
    assert engine.teacher_cache(teacher, ds, [8, 16], cpu, "fp32", desc="t") is None
    line = capsys.readouterr().out.strip()
    assert line.startswith("t: teacher features not cached") and "color_jitter" in line and "\n" not in line
    ds.augmentations = ("hflip",)
    first = engine.teacher_cache(teacher, ds, [8, 16], cpu, "fp32", indices=[0, 2, 4])
    assert sorted(first.maps) == [(ds.ids[i], f) for i in (0, 2, 4) for f in (False, True)]
    teacher.transform.min_size = (32,)  # another input size: the cached maps would be wrong
    second = engine.teacher_cache(teacher, ds, [8, 16], cpu, "fp32", indices=[0, 2, 4])
    assert second is not first and second.maps[(ds.ids[0], False)][8].shape[-1] == 4


def test_batches_give_each_rank_a_fixed_shard(monkeypatch):
    """Under torchrun a rank draws its batches from its own shard of the images, every pass (so that it caches
    only those); in one process the batches are the permutations of all images, as before shards existed."""
    one = engine.Batches(10, 3, seed=7)
    first = next(iter(one))
    old = torch.randperm(10, generator=torch.Generator().manual_seed(7 * 100_003))[:3].tolist()
    assert first == old
    monkeypatch.setattr(engine, "distributed", lambda: True)
    monkeypatch.setattr(engine.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(engine.dist, "get_world_size", lambda: 2)
    rank1 = engine.Batches(10, 2, seed=7)
    it = iter(rank1)
    seen = {i for _ in range(20) for i in next(it)}
    assert rank1.shard.tolist() == [1, 3, 5, 7, 9] and seen == {1, 3, 5, 7, 9}


@pytest.mark.slow
def test_bf16_path_is_deterministic_and_saves_plain_float32(zoo, tmp_path):
    """--precision bf16 vs fp32 through `distill`: each is deterministic for a seed, they train to
    different but close weights, and the exported student is a contiguous float32 state_dict."""
    base, root = zoo
    outs = {}
    for name, extra in (("fast1", ["--precision", "bf16"]), ("fast2", ["--precision", "bf16"]),
                        ("fp32", ["--precision", "fp32"])):
        out = tmp_path / name
        r = run_cli("distill", "--student", base / "s.pt", "--teachers", base / "t1.pt", "--keep-order",
                    "--steps", "3", "--batch", "4", "--data", root, "--out", out, *extra)
        assert r.returncode == 0, r.stderr
        outs[name] = torch.load(out / "student.pt", weights_only=True)
    fast, again, plain = outs["fast1"], outs["fast2"], outs["fp32"]
    assert all(torch.equal(fast[k], again[k]) for k in fast)
    assert any(not torch.equal(fast[k], plain[k]) for k in fast)
    assert all(v.dtype != torch.bfloat16 and v.is_contiguous() for v in fast.values())
    assert all(v.dtype == torch.float32 for k, v in fast.items() if v.is_floating_point())
    start = torch.load(base / "s.pt", weights_only=True)["model"]
    w = "backbone.body.layer1.0.conv1.weight"  # the paths differ by less than the training moved either
    assert (fast[w] - plain[w]).abs().mean() < (plain[w] - start[w]).abs().mean()


def test_cost_matrix_leaves_the_models_as_they_came(zoo):
    """The cost matrix only reads the models: a student in training mode stays trainable (distill trains it
    next), a frozen teacher stays frozen."""
    base, root = zoo
    student = engine.load(str(base / "s.pt"))[0].train()
    teacher = mtpd.freeze(engine.load(str(base / "t1.pt"))[0])
    grads = [p.requires_grad for p in student.parameters()]
    cost = engine.cost_matrix({"s": student, "t1": teacher}, data.CocoDetection(root, "train", masks=False),
                              4, torch.device("cpu"), batch=2)
    assert cost["s"]["t1"] > 0 and cost["t1"]["s"] > 0
    assert student.training and any(grads) and [p.requires_grad for p in student.parameters()] == grads
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.slow
def test_distill_with_bgs_trains_the_student(zoo, tmp_path):
    """Without --keep-order, distill fits the costs over the student and the teachers, orders them by BGS
    and trains each stage (the cost fitting once froze the student: AdamW got no parameters)."""
    base, root = zoo
    out = tmp_path / "bgs"
    r = run_cli("distill", "--student", base / "s.pt", "--teachers", base / "t1.pt", base / "t2.pt",
                "--k", "2", "--images", "4", "--steps", "2", "--batch", "2", "--data", root, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    order, cost = json.load(open(out / "order.json"))["order"], json.load(open(out / "cost.json"))["cost"]
    assert 1 <= len(order) <= 2 and set(order) <= {"t1", "t2"} and set(cost) == {"s", "t1", "t2"}
    assert all((out / f"stage{i + 1}.pt").is_file() for i in range(len(order)))
    start = torch.load(base / "s.pt", weights_only=True)["model"]
    trained = torch.load(out / "student.pt", weights_only=True)
    assert any(not torch.equal(trained[k], start[k]) for k in start if start[k].is_floating_point())


def test_fused_adamw_matches_the_plain_one():
    """engine.adamw(fused=True) takes the same steps as torch's default AdamW (to float rounding)."""
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 3)
    b, start = copy.deepcopy(a), a.weight.detach().clone()
    oa, ob = engine.adamw(a.parameters(), 1e-2, 1e-4), engine.adamw(b.parameters(), 1e-2, 1e-4, fused=True)
    assert ob.defaults["fused"] and not oa.defaults.get("fused")
    x = torch.randn(16, 6)
    for _ in range(5):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(b.weight, start, atol=1e-3)  # they did move


@pytest.mark.slow
def test_torchrun_ddp_two_processes_train_and_evaluate(tmp_path):
    """2 ranks (gloo, CPU) through one distillation stage: it trains, only rank 0 writes, and the AP it
    gathers from both ranks' shards equals a single-process evaluation of the saved weights (5 val
    images: DistributedSampler repeats one, which must be counted once)."""
    root = str(tmp_path / "shapes")
    data.make_shapes(root, n_train=8, n_val=5, size=64, seed=4, progress=False)
    cats = data.CocoDetection(root, "val", masks=False).category_ids
    for label, name in (("s", "retinanet_r18"), ("t", "retinanet_r34")):
        spec = engine.make_spec(label, name, 1.0, 64, cats, fpn_channels=16, head_convs=1)
        torch.manual_seed(0)
        model = engine.build(spec)
        # a student that already detects something, so that the AP comparison means something
        if label == "s":
            engine.train_loop(model, engine.loaders(root, 4, 0, masks=False)[0], 40, torch.device("cpu"), 0,
                              dict(train.RECIPE, lr=2e-3))
        engine.save_ckpt(str(tmp_path / f"{label}.pt"), model, spec, {"AP": 0.5})
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        "2", os.path.join(HERE, "train.py"), "distill", "--student", str(tmp_path / "s.pt"),
                        "--teachers", str(tmp_path / "t.pt"), "--keep-order", "--no-inherit", "--steps", "4",
                        "--batch", "2", "--data", root, "--out", str(out)], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("stage 1 (t): AP") == 1  # printed by rank 0 only
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    stages = [rec for rec in log if rec["event"] == "stage"]
    assert len(stages) == 1 and sum(rec["event"] == "trained" for rec in log) == 1  # written once
    before = torch.load(tmp_path / "s.pt", weights_only=True)["model"]
    after = torch.load(out / "stage1.pt", weights_only=True)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    model, _, _ = engine.load(str(out / "stage1.pt"))
    _, val = engine.loaders(root, 2, 0, masks=False)
    single = engine.evaluate(model, val, torch.device("cpu"))
    assert 0 <= stages[0]["AP"] <= 1 and single["AR100"] > 0
    assert all(stages[0][k] == pytest.approx(single[k], abs=1e-9) for k in data.SUMMARY_KEYS)

@pytest.mark.slow
def test_torchrun_cost_matrix_splits_the_images_and_equals_one_process(zoo, tmp_path):
    """Under torchrun each rank takes its share of the fit and held-out images and the statistics are summed:
    the matrix equals the one-process matrix (to float rounding), and only rank 0 writes it."""
    base, root = zoo
    ckpts = [str(base / "s.pt"), str(base / "t1.pt"), str(base / "t2.pt")]
    single = tmp_path / "single.json"
    r = run_cli("cost", "--ckpts", *ckpts, "--data", root, "--images", "8", "--out", single)
    assert r.returncode == 0, r.stderr[-2000:]
    split = tmp_path / "split.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", os.path.join(HERE, "train.py"), "cost", "--ckpts", *ckpts,
                        "--data", root, "--images", "8", "--out", str(split)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = json.load(open(single))["cost"], json.load(open(split))["cost"]
    assert one.keys() == two.keys() and all(one[a].keys() == two[a].keys() for a in one)
    assert all(two[a][b] == pytest.approx(one[a][b], rel=1e-6, abs=1e-9) for a in one for b in one[a])
    # a real matrix, not constants
    assert len({round(v, 6) for row in one.values() for v in row.values()}) > 1


@pytest.mark.slow
def test_killed_distillation_resumes_to_identical_weights(zoo, tmp_path):
    base, root = zoo
    args = ["distill", "--student", base / "s.pt", "--teachers", base / "t1.pt", base / "t2.pt",
            "--keep-order", "--steps", "8", "--ckpt-every", "2", "--batch", "2", "--data", root]
    args = [str(a) for a in args]
    script = os.path.join(HERE, "train.py")
    r = subprocess.run([sys.executable, script, *args, "--out", str(tmp_path / "a")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, script, *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while p.poll() is None and not (out / "stage2.state.pt").exists():  # kill in stage 2, at iteration 2+
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and not (out / "student.pt").exists()  # killed mid-run
    r = subprocess.run([sys.executable, script, *args, "--out", str(out), "--resume"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed at iteration" in r.stdout and "stage 1 (t1): done earlier" in r.stdout
    a = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    b = torch.load(out / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob("*.state.pt"))  # resume states are removed once their stage is saved


def test_atomic_save_keeps_previous_file_when_the_write_crashes(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    engine.save(path, {"w": torch.ones(3)})

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        engine.save(path, {"w": torch.zeros(3)})
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_nonfinite_loss_stops_naming_the_terms_and_keeps_the_checkpoint(zoo, tmp_path):
    base, root = zoo
    loader, _ = engine.loaders(root, 2, 0, masks=False)
    model, _, _ = engine.load(str(base / "s.pt"))
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(float("nan"))
    state = tmp_path / "state.pt"
    state.write_bytes(b"the last good state")
    with pytest.raises(engine.InputError,
                       match="non-finite loss at iteration 0.*classification.*bbox_regression"):
        engine.train_loop(model, loader, 4, torch.device("cpu"), 0, dict(train.RECIPE, lr=1e-3, every=1),
                          state=str(state))
    assert state.read_bytes() == b"the last good state"


class Payload:  # a pickled object: torch.load(weights_only=True) must refuse it
    pass


def test_loading_refuses_pickled_code_and_reports_bad_checkpoints(zoo, tmp_path):
    base, _ = zoo
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(engine.InputError, match="refused to load .*pickled Python objects"):
        engine.load(str(tmp_path / "evil.pt"))
    raw = (base / "s.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(engine.InputError, match="corrupt or truncated"):
        engine.load(str(tmp_path / "cut.pt"))
    ck = torch.load(base / "s.pt", weights_only=True)
    ck["spec"]["name"] = "retinanet_r34"  # weights of an R18 under an R34 spec
    torch.save(ck, tmp_path / "mismatch.pt")
    with pytest.raises(engine.InputError, match="does not match its spec retinanet_r34"):
        engine.load(str(tmp_path / "mismatch.pt"))


def _coco_copy(root, dst, edit):
    shutil.copytree(root, dst)
    path = os.path.join(dst, "annotations", "instances_train2017.json")
    edit(path)
    return str(dst)


@pytest.mark.slow
def test_bad_inputs_fail_in_one_line_with_exit_2_and_write_nothing(zoo, tmp_path, capsys, monkeypatch):
    base, root = zoo
    out = tmp_path / "out"
    s, t1 = base / "s.pt", base / "t1.pt"
    train_args = ["train", "--model", "retinanet_r18", "--epochs", "1", "--batch", "2", "--out", out,
                  "--data"]
    bad_json = _coco_copy(root, tmp_path / "badjson", lambda p: open(p, "w").write("{not json"))
    no_keys = _coco_copy(root, tmp_path / "nokeys", lambda p: open(p, "w").write('{"images": []}'))
    no_image = _coco_copy(root, tmp_path / "noimage",
                          lambda p: os.remove(os.path.join(os.path.dirname(p), "..", "train2017",
                                                           "000000.png")))

    broken = _coco_copy(root, tmp_path / "broken",
                        lambda p: open(os.path.join(os.path.dirname(p), "..", "train2017", "000000.png"),
                                       "w").write("x"))

    def empty_val(p):
        v = p.replace("train2017", "val2017")
        d = json.load(open(v))
        json.dump({**d, "images": [], "annotations": []}, open(v, "w"))
    empty = _coco_copy(root, tmp_path / "empty", empty_val)
    other = tmp_path / "other.pt"  # a teacher trained on other classes
    ck = torch.load(t1, weights_only=True)
    ck["spec"]["category_ids"] = [1, 2, 3, 4, 5]
    torch.save(ck, other)
    named_s = tmp_path / "named_s.pt"  # a teacher with the student's label
    ck = torch.load(t1, weights_only=True)
    ck["spec"]["label"] = "s"
    torch.save(ck, named_s)
    json.dump({"cost": {"s": {"t1": 0.5}, "t1": {"s": 0.1}}, "ap": {"t1": 0.3, "t2": 0.4}},
              open(tmp_path / "cost.json", "w"))
    (tmp_path / "afile").write_text("x")
    cases = [
        (train_args + [tmp_path / "nowhere"], "no COCO-format data"),
        (train_args + [bad_json], "is not valid JSON"),
        (train_args + [no_keys], "lacks annotations, categories"),
        (train_args + [no_image], "missing from"),
        (train_args + [empty], "empty split"),
        (train_args + [broken], "cannot read image"),  # found only when its batch is loaded, mid-training
        (["train", "--model", "retinanet_vgg", "--out", out, "--data", root], "known models: retinanet_r18"),
        (["train", "--model", "retinanet_r18", "--data", root, "--out", tmp_path / "afile" / "sub"],
         "not a writable folder"),
        (["train", "--model", "retinanet_r18", "--data", root, "--device", "cuda", "--out", out],
         "no CUDA GPU"),
        (["distill", "--student", s, "--teachers", other, "--data", root, "--out", out],
         "trained on categories"),
        (["distill", "--student", s, "--teachers", t1, "--data", root, "--k", "0", "--out", out],
         "--k must be"),
        (["distill", "--student", tmp_path / "none.pt", "--teachers", t1, "--data", root, "--out", out],
         "does not exist"),
        (["order", "--cost", tmp_path / "cost.json", "--student", "s", "--k", "2"],
         "is every model in the cost"),
        (["train", "--model", "retinanet_r18", "--data", root, "--ckpt-every", "0", "--out", out],
         "--ckpt-every"),
        (["distill", "--student", s, "--teachers", t1, t1, "--data", root, "--out", out],
         "have the label 't1'"),
        (["distill", "--student", s, "--teachers", named_s, "--data", root, "--out", out],
         "have the label 's'"),
        (["cost", "--ckpts", s, named_s, "--data", root, "--out", out / "c.json"], "have the label 's'"),
        (["distill", "--student", s, "--teachers", t1, "--data", root, "--mechanism", "cwd", "pkd",
          "--keep-order", "--out", out], "one per stage"),
        (["distill", "--student", s, "--teachers", t1, base / "t2.pt", "--data", root, "--mechanism", "cwd",
          "pkd", "--out", out], "BGS decides"),
        (["order", "--all", "--ckpt-student", s, "--teachers", t1, named_s, "--data", root, "--out", out],
         "have the label 's'"),
        (["reproduce", "--preset", "gap", "--premise", "r18@1x", "r18@3x", "--out", out],
         "r18@3x not in the gap preset's pool"),
    ]
    if torch.cuda.is_available():
        cases = [c for c in cases if "cuda" not in c[0]]
    for argv, message in cases:
        code, err = cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert not out.exists(), argv


def test_no_common_stride_is_a_clear_error(zoo, monkeypatch):
    base, root = zoo
    loader, _ = engine.loaders(root, 2, 0, masks=False)
    student, teacher = engine.load(str(base / "s.pt"))[0], engine.load(str(base / "t1.pt"))[0]

    def features(model, images):  # a teacher whose levels sit at strides the student lacks
        feats = fpn_features(model, images)
        return {s * 1024: f for s, f in feats.items()} if model is teacher else feats

    monkeypatch.setattr(engine, "fpn_features", features)
    with pytest.raises(engine.InputError, match="no common FPN stride"):
        engine.train_loop(student, loader, 2, torch.device("cpu"), 0, dict(train.RECIPE, lr=1e-3), [teacher])


def test_lstsq_adapter_starts_the_feature_loss_at_the_fitted_map(zoo):
    """--adapter lstsq: with a teacher that is a copy of the student, the least-squares map is close to the
    identity, so the first logged feature loss is about the identity adapter's and well below the one a
    conv adapter at torch's init starts with; the fit leaves the student's weights and statistics alone."""
    base, root = zoo
    loader, _ = engine.loaders(root, 4, 0, masks=False)
    start = {}
    for adapter in ("conv", "lstsq", "auto"):
        student = engine.load(str(base / "s.pt"))[0]
        bns = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:  # running statistics of these images, so that train and eval mode agree (as trained)
            m.reset_running_stats(), setattr(m, "momentum", None)
        with torch.no_grad():
            fpn_features(student.train(), [loader.dataset[i][0] for i in range(8)])
        for m in bns:
            m.momentum = 0.1
        teacher = copy.deepcopy(student)
        logs = []
        if adapter == "lstsq":  # the fit alone changes nothing in the student
            before = {k: v.clone() for k, v in student.state_dict().items()}
            ads, _ = engine.stage_adapters(student, [teacher], [loader.dataset[0][0]], conv=True)
            engine.init_lstsq_adapters(student, [teacher], ads, loader.dataset, torch.device("cpu"), 8)
            assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
            assert not torch.allclose(ads[0]["8"].proj.weight.flatten(1), torch.zeros(16, 16))
        engine.train_loop(student, loader, 1, torch.device("cpu"), 0,
                          dict(train.RECIPE, lr=1e-3, adapter=adapter, adapter_images=8), [teacher],
                          log=logs.append)
        start[adapter] = next(r["distill"] for r in logs if r.get("event") == "step")
    # the copy's identity is the exact map; what remains is train-mode BatchNorm on a batch of 4 (flipped)
    # against the teacher's eval mode: the fitted map does as well as the identity, far below conv's start
    assert start["lstsq"] < 1.1 * start["auto"] and start["lstsq"] < 0.5 * start["conv"], start


@pytest.mark.slow
def test_cpu_training_is_deterministic_across_processes(zoo, tmp_path):
    """Two fresh processes, same seed: identical weights (torch's default generator starts from a random
    state in each process, so every model's initialisation must be seeded)."""
    _, root = zoo
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "train", "--model",
                            "retinanet_r18", "--epochs", "1", "--batch", "4", "--data", root, "--min-size",
                            "64", "--seed", "3", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(torch.load(out / "model.pt", weights_only=True)["model"])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.slow
def test_distill_inherit_copies_the_first_teachers_neck_and_head_once(zoo, tmp_path, capsys):
    base, root = zoo
    args = ["distill", "--student", base / "s.pt", "--teachers", base / "t1.pt", base / "t2.pt",
            "--keep-order", "--steps", "1", "--batch", "2", "--data", root, "--inherit", "--lam", "0",
            "--out", tmp_path / "d"]
    train.main([str(a) for a in args])
    out = capsys.readouterr().out
    assert (out.count("inherited") == 1
            and "stage 1: inherited 24 of the student's 24 neck/head tensors" in out)
    s, t1 = engine.read(str(base / "s.pt"))["model"], engine.read(str(base / "t1.pt"))["model"]
    after = engine.read(str(tmp_path / "d" / "stage1.pt"))["model"]  # one step at lr 3e-4 / 50 later
    neck = [k for k in s if k.startswith(("backbone.fpn.", "head.")) and s[k].is_floating_point()]
    assert all(torch.allclose(after[k], t1[k], atol=1e-4) for k in neck)
    assert any(not torch.allclose(after[k], s[k], atol=1e-2) for k in neck)
    body = [k for k in s if k.startswith("backbone.body.") and k.endswith("conv1.weight")]
    assert all(torch.allclose(after[k], s[k], atol=1e-4) for k in body)  # the body stays the student's


def test_inherit_with_nothing_in_common_is_a_clear_error(zoo):
    base, root = zoo
    loader, _ = engine.loaders(root, 2, 0, masks=False)
    student, spec, _ = engine.load(str(base / "s.pt"))
    teacher = engine.build(dict(spec, name="maskrcnn_r18", fpn_channels=32))
    with pytest.raises(engine.InputError, match="nothing to inherit"):
        engine.train_loop(student, loader, 1, torch.device("cpu"), 0, dict(train.RECIPE, lr=1e-3), [teacher],
                          inherit_first=True)
