"""train.py and engine.py: the Table-3 reproduction end to end, the path a reader follows, resume and
SIGTERM, torchrun, precision by hardware, the teacher-feature cache, one-line errors."""
import json
import os
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
from conftest import HERE, cli, run_cli, tiny_batch


# The reproduction -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_reproduction_writes_every_row_and_a_plain_student(tiny_run):
    out, res, _, printed = tiny_run
    assert list(res["runs"]) == ["ots", "long", "long_restart", "direct", "ensemble", "mtpd"]
    assert all(0 <= m["AP"] <= 1 for m in res["runs"].values())
    assert 1 <= len(res["order"]) <= 2 and set(res["order"]) <= {"r18@1x", "r34@1x"}
    assert res["order"][-1] == max(res["teachers"], key=res["teachers"].get) or len(res["order"]) == 1
    assert set(res["cost"]) == {"ots", "r18@1x", "r34@1x"}
    assert all(v > 0 for r in res["cost"].values() for v in r.values())
    assert json.load(open(os.path.join(out, "results.json")))["order"] == res["order"]
    assert "mtpd - direct" in printed and all(f"\n{row} " in printed for row in res["runs"])
    spec = json.load(open(os.path.join(out, "student_spec.json")))
    plain = engine.build(spec)
    plain.load_state_dict(torch.load(os.path.join(out, "student.pt"), weights_only=True))  # strict
    last = engine.read(os.path.join(out, "ckpt", f"mtpd_stage{len(res['order'])}.pt"))["model"]
    assert all(torch.equal(v, last[k]) for k, v in plain.state_dict().items())
    steps = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"step"' in line]
    assert any("distill" in r and r["distill_levels"] for r in steps)
    # a rerun reuses every checkpoint: the same table, no training
    t = time.time()
    again = train.main(["--preset", "tiny", "--out", out, "--pool", os.path.join(out, "ckpt")])
    assert again["runs"] == res["runs"]
    assert time.time() - t < 60


@pytest.mark.slow
def test_the_path_from_python_train_py_to_the_feature_loss_is_short(tiny_run):
    """The deepest stack (an MTPD stage) from train.main to mtpd.feature_loss, in the project's files: with
    the module's own frame, at most 9 frames and 2 changes of file."""
    stack = tiny_run[2]
    files = [os.path.basename(f.filename) for f in stack]
    start = files.index("train.py")
    names = [f"{os.path.basename(f.filename)}:{f.name}" for f in stack[start:]] + ["mtpd.py:feature_loss"]
    files = files[:start] + [n.split(":")[0] for n in names]
    print(" -> ".join(names))
    assert names[0] == "train.py:main" and names[-2] == "mtpd.py:distill_losses"
    assert "train.py:progressive" in names
    assert 1 + len(names) <= 9
    assert sum(a != b for a, b in zip(files[start:], files[start + 1:])) <= 2


# Resume, SIGTERM, determinism -------------------------------------------------------------------------------
def distill_argv(zoo, out, *more):
    base, root = zoo
    return ["distill", "--student", base / "s.pt", "--teachers", base / "t1.pt", "--keep-order",
            "--data", root, "--batch", 2, "--steps", 40, "--precision", "fp32", "--out", out, *more]


@pytest.mark.slow
def test_sigterm_writes_the_state_at_once_and_resume_ends_with_identical_weights(zoo, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    whole = run_cli(*distill_argv(zoo, tmp_path / "whole"), env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = tmp_path / "cut"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *map(str, distill_argv(zoo, cut))],
                         cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = cut / "log.jsonl"
    while p.poll() is None and not (log.exists() and '"step": 10' in log.read_text()):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "--resume" in stdout and "Traceback" not in stderr
    state = engine.read(str(cut / "stage1.state.pt"))
    assert 10 < state["run"]["step"] < 40 and not (cut / "stage1.pt").exists()
    resumed = run_cli(*distill_argv(zoo, cut, "--resume"), env=env)
    assert resumed.returncode == 0 and f"resumed at iteration {state['run']['step']}" in resumed.stdout
    a, b = (engine.read(str(d / "stage1.pt"))["model"] for d in (tmp_path / "whole", cut))
    assert all(torch.equal(a[k], b[k]) for k in a) and not (cut / "stage1.state.pt").exists()


def test_training_is_deterministic_and_saves_float32_whatever_the_precision(zoo, tmp_path):
    base, root = zoo
    loader = engine.loaders(root, 2, 0, False, torch.device("cpu"))[0]
    weights = []
    for precision in ("fp32", "fp32", "bf16"):
        model = engine.load(str(base / "s.pt"))[0]
        recipe = dict(train.RECIPE, precision=precision, lam=1.0, normalize=True, resume=False)
        teacher = engine.load(str(base / "t1.pt"))[0]
        out = engine.train(model, loader, 3, torch.device("cpu"), 0, recipe, [teacher])
        assert out["distill_share_start"] > 0
        engine.save_ckpt(str(tmp_path / "m.pt"), model, {}, {})
        weights.append(engine.read(str(tmp_path / "m.pt"))["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights[2].values())
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])  # bf16 ran


def test_batches_are_a_function_of_seed_and_iteration_and_shard_by_rank(monkeypatch):
    first = iter(engine.Batches(10, 3, seed=1))
    seq = [next(first) for _ in range(7)]
    later = iter(engine.Batches(10, 3, seed=1, start=4))
    assert [next(later) for _ in range(3)] == seq[4:]
    assert sorted(i for b in seq[:3] for i in b) == sorted(set(i for b in seq[:3] for i in b))  # a pass
    monkeypatch.setattr(engine, "distributed", lambda: True)
    monkeypatch.setattr(engine.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(engine.dist, "get_rank", lambda: 1)
    shard = iter(engine.Batches(10, 2, seed=1))
    assert all(i % 2 == 1 for _ in range(5) for i in next(shard))


def test_a_nonfinite_loss_stops_in_one_line_naming_the_terms(zoo, tmp_path, capsys, monkeypatch):
    real = mtpd.distill_losses
    nan = torch.tensor(float("nan"))
    monkeypatch.setattr(mtpd, "distill_losses", lambda *a, **kw: dict(real(*a, **kw), distill=nan))
    code, err = cli(capsys, *distill_argv(zoo, tmp_path / "nan"))
    assert code == 2 and "non-finite loss at iteration 0" in err and "'distill': nan" in err
    assert not (tmp_path / "nan" / "stage1.pt").exists()


def test_atomic_write_keeps_the_previous_file_when_the_write_crashes(tmp_path):
    path = str(tmp_path / "f.json")
    data.atomic_write(path, lambda f: f.write("old"))

    def crash(f):
        f.write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        data.atomic_write(path, crash)
    assert open(path).read() == "old"


# torchrun -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_distil_and_agree(zoo, tmp_path):
    base, root = zoo
    argv = ["distill", "--student", base / "s.pt", "--teachers", base / "t1.pt", base / "t2.pt",
            "--data", root, "--batch", 2, "--steps", 4, "--precision", "fp32", "--out", tmp_path / "ddp"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*launch, os.path.join(HERE, "train.py"), *map(str, argv)], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    order = json.load(open(tmp_path / "ddp" / "order.json"))["order"]
    assert r.stdout.count("order: ") == 1  # only rank 0 prints
    assert all((tmp_path / "ddp" / f"stage{i + 1}.pt").exists() for i in range(len(order)))
    assert 0 <= engine.read(str(tmp_path / "ddp" / "stage1.pt"))["metrics"]["AP"] <= 1


# Precision and the cache --------------------------------------------------------------------------------
def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert engine.choose_precision(cpu)[0] == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    precision, why = engine.choose_precision(cpu)
    assert precision == "fp32" and "no native bfloat16" in why
    assert "emulates it" in engine.choose_precision(cpu, "bf16")[1]
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "GPU")
    for capability, expected in (((9, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert engine.choose_precision(cuda)[0] == expected


def test_cached_teacher_features_are_the_teachers_and_fill_up_to_the_limit(zoo, tmp_path):
    base, root = zoo
    teacher = mtpd.freeze(engine.load(str(base / "t1.pt"))[0])
    images, _ = tiny_batch(3)
    targets = [{"image_id": i, "flipped": bool(i % 2)} for i in range(3)]
    cache = {}
    first = engine.teacher_features(teacher, images, targets, "fp32", cache)  # a miss: the forward, stored
    again = engine.teacher_features(teacher, images[::-1], targets, "fp32", cache)  # the images are ignored
    assert sorted(first) == sorted(again) == [8, 16, 32, 64, 128] and again.sizes == first.sizes
    assert all(torch.equal(first[s], again[s]) for s in first)
    small = {}
    engine.teacher_features(teacher, images, targets, "fp32", small, limit=1)
    assert set(small) == {"bytes", (0, False)}  # the limit reached after the first image: the rest not kept
    # on data of mixed image sizes a map depends on its batch's padding: no cache there
    mixed = tmp_path / "mixed"
    data.make_shapes(str(mixed), 4, 2, sizes=[(64, 64), (48, 64)], progress=False)
    teacher.source = "a file"
    recipe = dict(train.RECIPE, precision="fp32", lam=1.0, normalize=True)
    for folder, cached in ((root, True), (str(mixed), False)):
        loader = engine.loaders(folder, 2, 0, False, torch.device("cpu"))[0]
        student = engine.load(str(base / "s.pt"))[0]
        st = engine.setup(student, loader, 1, torch.device("cpu"), 0, recipe, [teacher])
        st.hooks.remove()
        assert (st.caches[id(st.teachers[0])] is not None) == cached


# The other subcommands and one-line errors ----------------------------------------------------------------
@pytest.mark.slow
def test_cost_order_and_eval_subcommands(zoo, tmp_path, capsys):
    base, root = zoo
    ckpts = [base / f"{x}.pt" for x in ("s", "t1", "t2")]
    train.main(["cost", "--ckpts", *ckpts, "--data", root, "--images", 4, "--out", tmp_path / "cost.json"])
    cost = json.load(open(tmp_path / "cost.json"))
    assert set(cost["cost"]) == {"s", "t1", "t2"} and cost["ap"]["t2"] == pytest.approx(0.2)
    capsys.readouterr()
    train.main(["order", "--cost", tmp_path / "cost.json", "--student", "s", "--k", 2])
    order = capsys.readouterr().out.strip().splitlines()[-1].split(" -> ")
    assert order == mtpd.backward_greedy_selection(cost["cost"], "s", {"t1": 0.2, "t2": 0.2}, 2)
    train.main(["eval", "--ckpt", base / "t1.pt", "--data", root, "--out", tmp_path / "ev"])
    text = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in text
    assert isinstance(json.load(open(tmp_path / "ev" / "detections_bbox.json")), list)


def test_bad_input_stops_in_one_line_with_exit_code_2_and_writes_nothing(zoo, tmp_path, capsys):
    base, root = zoo
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    torch.save({"model": {}, "spec": {}, "evil": object()}, tmp_path / "pickled.pt")
    (tmp_path / "file").write_text("x")
    spec = dict(engine.read(str(base / "t1.pt"))["spec"], label="other", category_ids=[1, 2])
    torch.save({"model": engine.read(str(base / "t1.pt"))["model"], "spec": spec, "metrics": {}},
               tmp_path / "othercats.pt")
    out = tmp_path / "never"
    s, t1 = base / "s.pt", base / "t1.pt"
    cases = {
        ("train", "--model", "resnet_9000", "--out", out): "unknown model 'resnet_9000'",
        ("train", "--model", "retinanet_r18", "--data", tmp_path, "--out", out): "no COCO-format data at",
        ("distill", "--student", tmp_path / "bad.pt", "--teachers", t1, "--data", root, "--out", out):
            "cannot read checkpoint",
        ("distill", "--student", tmp_path / "pickled.pt", "--teachers", t1, "--data", root, "--out", out):
            "refused to load",
        ("distill", "--student", s, "--teachers", s, "--data", root, "--out", out): "two models have",
        ("distill", "--student", s, "--teachers", tmp_path / "othercats.pt", "--data", root, "--out", out):
            "has categories [1, 2]",
        ("distill", "--student", s, "--teachers", t1, "--data", root, "--out", tmp_path / "file" / "x"):
            "cannot write the output",
        ("distill", "--student", s, "--teachers", t1, "--data", root, "--k", 0, "--out", out): "--k must",
        ("distill", "--student", s, "--teachers", t1, "--mechanism", "cwd", "pkd", "--data", root, "--out",
         out): "one per teacher with --keep-order",
        ("order", "--cost", tmp_path / "file", "--student", "s"): "cannot order the teachers",
        ("reproduce", "--device", "cuda", "--out", out): "no CUDA GPU",
    }
    if torch.cuda.is_available():
        cases.pop(("reproduce", "--device", "cuda", "--out", out))
    for argv, message in cases.items():
        code, err = cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert not out.exists()


def test_p6_p7_stay_float32_under_bf16_so_1x1_maps_get_finite_gradients():
    """At 64 px a RetinaNet's P6/P7 are 1x1, where oneDNN's bf16 convolution backward gave NaN weight
    gradients: models.Float32P6P7 runs them in float32."""
    from conftest import tiny_detector
    torch.manual_seed(0)
    model = tiny_detector(size=64)
    images, targets = tiny_batch()
    with torch.autocast("cpu", torch.bfloat16):
        feats = model.backbone(model.transform(images)[0].tensors)
        loss = sum(model(images, targets).values())
    dtypes = [f.dtype for f in feats.values()]
    assert dtypes[0] == torch.bfloat16 and dtypes[-2:] == [torch.float32] * 2
    loss.backward()
    p7 = model.backbone.fpn.extra_blocks.p7.weight.grad
    assert p7.dtype == torch.float32 and torch.isfinite(p7).all() and p7.abs().sum() > 0


def test_fp16_trains_with_a_grad_scaler_whose_state_is_saved_and_cost_matrix_leaves_models_as_they_came(
        zoo, tmp_path):
    base, root = zoo
    loader = engine.loaders(root, 2, 0, False, torch.device("cpu"))[0]
    model = engine.load(str(base / "s.pt"))[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = dict(train.RECIPE, lr=1e-3, precision="fp16", lam=1.0, normalize=True, resume=False,
                  ckpt_every=3)
    engine.train(model, loader, 3, torch.device("cpu"), 0, recipe, [engine.load(str(base / "t1.pt"))[0]],
                 state=str(tmp_path / "state.pt"))
    after = model.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert engine.read(str(tmp_path / "state.pt"))["scaler"]["scale"] > 0
    student, teacher = model.train(), mtpd.freeze(engine.load(str(base / "t1.pt"))[0])
    grads = [p.requires_grad for p in student.parameters()]
    cost = engine.cost_matrix({"s": student, "t1": teacher}, data.CocoDetection(root, "train", masks=False),
                              4, torch.device("cpu"), batch=2)
    assert cost["s"]["t1"] > 0 and cost["t1"]["s"] > 0
    assert student.training and [p.requires_grad for p in student.parameters()] == grads
    assert not teacher.training
