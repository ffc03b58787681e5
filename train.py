"""mtpd command line: train, eval, cost, order, distill, reproduce. All configuration lives in this file.

    python train.py                      # = reproduce --preset default: the whole method on built-in data
    python train.py reproduce --preset tiny --out runs/tiny
    python train.py train --model retinanet_r18 --scale 0.5 --out runs/r18
    python train.py cost --ckpts a.pt b.pt c.pt --out cost.json
    python train.py order --cost cost.json --student a --k 3
    python train.py distill --student a.pt --teachers b.pt c.pt --out runs/distill
"""
import argparse
import json
import os
import sys
import time

import torch

import analysis
import data
import engine
import mtpd
import report
from engine import build, load, make_spec, save, save_ckpt, save_json
from models import ZOO

# ---------------------------------------------------------------------------------------------------------
# Presets for `reproduce`. A pool entry is (label, model name, input scale, extra build kwargs).
# Measured on 2 CPU cores (see README): tiny ~2 min, default <= 30 min.
# ---------------------------------------------------------------------------------------------------------
SMALL = dict(fpn_channels=128, head_convs=2)  # a light RetinaNet: at 128 px its head dominates the step
PRESETS = {
    "tiny": dict(n_train=48, n_val=24, size=64, batch=8, lr=1e-3, lam=1.0, k=3, cost_images=16,
                 student=("student", "retinanet_r18", 0.5, SMALL), student_steps=30, stage_steps=12,
                 probe=(1, 8), landscape=dict(points=5, dirs_1d=1, points_2d=3),
                 pool=[("r18@1x", "retinanet_r18", 1.0, SMALL, 30),
                       ("r34@1x", "retinanet_r34", 1.0, SMALL, 30)]),
    "default": dict(n_train=800, n_val=200, size=128, batch=8, lr=3e-4, lam=1.0, k=3, cost_images=64,
                    student=("student", "retinanet_r18", 0.5, SMALL), student_steps=800, stage_steps=300,
                    probe=(4, 8), landscape=dict(points=11, dirs_1d=3, points_2d=7),
                    pool=[("r18@0.75x", "retinanet_r18", 0.75, SMALL, 1000),
                          ("r18@1x", "retinanet_r18", 1.0, SMALL, 1000),
                          ("r50@1x", "retinanet_r50", 1.0, dict(SMALL, zero_init_residual=True), 600),
                          ("mrcnn_r18@1x", "maskrcnn_r18", 1.0, dict(fpn_channels=128), 200)]),
    # Needs a GPU: a Swin teacher, which a CPU cannot train well in minutes (measured: 4.9 AP after
    # 300 steps, 5 min, on the default data), and full-width heads.
    "gpu": dict(n_train=8000, n_val=500, size=256, batch=16, lr=3e-4, lam=1.0, k=3, cost_images=256,
                student=("student", "retinanet_r18", 0.5, {}), student_steps=10000, stage_steps=5000,
                probe=(8, 16), landscape=dict(points=21, dirs_1d=3, points_2d=11),
                pool=[("r18@1x", "retinanet_r18", 1.0, {}, 10000),
                      ("r50@1x", "retinanet_r50", 1.0, dict(zero_init_residual=True), 15000),
                      ("maskrcnn_r50@1x", "maskrcnn_r50", 1.0, dict(zero_init_residual=True), 15000),
                      ("swin_t@1x", "retinanet_swin_t", 1.0, {}, 20000)]),
}


fail = engine.fail  # raises engine.InputError; main() prints it as one line and exits with code 2


# ---------------------------------------------------------------------------------------------------------
# Data, models and checkpoints.
# ---------------------------------------------------------------------------------------------------------
def dataset_root(args):
    """--data, or the embedded shapes benchmark (generated once, next to the runs)."""
    if args.data:
        if not os.path.isfile(os.path.join(args.data, "annotations", "instances_train2017.json")):
            fail(f"no COCO-format data at {args.data}: expected annotations/instances_train2017.json "
                 "and train2017/ (or leave out --data to use the built-in shapes benchmark)")
        return args.data
    p = PRESETS[getattr(args, "preset", None) or "default"]
    root = os.path.join("data", f"shapes{p['size']}_{p['n_train']}")
    if engine.is_main() and not os.path.isfile(os.path.join(root, "annotations", "instances_val2017.json")):
        stats = data.make_shapes(root, p["n_train"], p["n_val"], p["size"], seed=0)
        print(f"wrote the shapes benchmark to {root}: {json.dumps(stats)}")
    engine.barrier()  # under torchrun, rank 0 writes it and the others wait
    return root


def train_opts(args):
    """The CUDA fast path (bf16 autocast, channels_last; off with --fp32; on a CPU plain float32), and
    the resume state written every --ckpt-every iterations (continued with --resume)."""
    on = args.device == "cuda" and not args.fp32
    return dict(bf16=on, channels_last=on, compile=args.compile, every=args.ckpt_every, resume=args.resume)


def check_writable(out):
    """Fail before any work if `out` cannot be created or written (checked without creating anything)."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        fail(f"cannot write the output {out}: {path} is not a writable folder; choose another --out")


def check_classes(student_spec, specs, root_cats=None):
    """Distillation pairs models of one label space (and the data's, when given)."""
    want = student_spec["category_ids"]
    for spec in specs:
        if spec["category_ids"] != want:
            fail(f"teacher {spec['label']} was trained on categories {spec['category_ids']}, the student on "
                 f"{want}: train the teachers on the student's data")
    if root_cats is not None and list(root_cats) != want:
        fail(f"the data has categories {list(root_cats)}, the student was trained on {want}; use the same data")


def loaders(args, root, batch, seed, masks):
    workers = args.workers if args.workers >= 0 else (4 if args.device == "cuda" else 0)
    return engine.loaders(root, batch, seed, masks, args.dev, workers)


# ---------------------------------------------------------------------------------------------------------
# BGS over a cost file (§3.2, Alg. 1).
# ---------------------------------------------------------------------------------------------------------
def teacher_order(cost, student, ap, k):
    try:
        return mtpd.backward_greedy_selection(cost, student, ap, k)
    except (KeyError, ValueError) as e:
        fail(f"cannot order the teachers: {e} (is every model in the cost file?)")


def every_order(args, student, teachers, bgs, steps, lr, lam, out, train_loader, val_loader, log):
    """Table 2: distil `student` (a checkpoint) through every order of `teachers` ({label: checkpoint}),
    `steps` iterations per stage. A prefix's student is cached in out/<t1+t2...>.pt, so orders sharing a
    prefix share its stages and an interrupted run continues. Every order uses the same seed per stage
    index, so orders differ only by their teachers. Returns {teachers, stage_steps, rows, bgs, bgs_rank}."""
    device = args.dev

    def run_prefix(prefix):
        path = os.path.join(out, "+".join(prefix) + ".pt")
        if os.path.isfile(path):
            return engine.read(path)["metrics"]
        model, spec, _ = load(os.path.join(out, "+".join(prefix[:-1]) + ".pt") if len(prefix) > 1 else student)
        desc = " -> ".join(prefix)
        det = engine.train_loop(model, train_loader, steps, lr, device, args.seed + len(prefix),
                                [load(teachers[prefix[-1]], device)[0]], lam, desc=desc, log=log,
                                state=path[:-3] + ".state.pt", **train_opts(args))
        metrics = {**engine.evaluate(model, val_loader, device), "train_det_loss": det}
        save_ckpt(path, model, spec, metrics)
        engine.discard(path[:-3] + ".state.pt")
        print(f"{desc:40s} AP {100 * metrics['AP']:5.1f}")
        return metrics

    rows = analysis.all_orders(list(teachers), run_prefix)
    return {"teachers": list(teachers), "stage_steps": steps, "rows": rows, "bgs": list(bgs),
            "bgs_rank": analysis.rank_of(rows, bgs)}


# ---------------------------------------------------------------------------------------------------------
# reproduce: pool -> cost -> BGS -> MTPD and its baselines at equal budget -> table.
# ---------------------------------------------------------------------------------------------------------
COLS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def table(rows):
    lines = [f"{'run':12s}" + "".join(f"{c:>7s}" for c in COLS)]
    for name, m in rows.items():
        lines.append(f"{name:12s}" + "".join(f"{100 * m[c]:7.1f}" if m[c] >= 0 else f"{'n/a':>7s}"
                                             for c in COLS))  # COCOeval's -1: no object of that size
    return "\n".join(lines)


def cmd_reproduce(args):
    p = PRESETS[args.preset]
    device = args.dev
    out = args.out or os.path.join("runs", args.preset)
    check_writable(out)
    t0 = time.time()
    root = dataset_root(args)
    log = engine.jsonl(os.path.join(out, "log.jsonl"))
    train_loader, val_loader = loaders(args, root, p["batch"], args.seed, masks=False)
    cats = train_loader.dataset.category_ids

    def ckpt(label):
        return os.path.join(out, "ckpt", f"{label}.pt")

    def mask_loader():  # a two-stage teacher trains on instance masks too
        return loaders(args, root, p["batch"], args.seed, masks=True)[0]

    def ready(label, model_args, steps, init=None, teachers=(), seed=None, snapshots=None):
        """Train (or reuse) one model and evaluate it; both are cached in the run folder.
        model_args = (label, name, scale, build kwargs); init: start from that checkpoint's weights;
        snapshots: {iteration: file} of intermediate weights to keep."""
        if os.path.isfile(ckpt(label)):  # reuse: only its metrics are needed here
            return engine.read(ckpt(label))["metrics"]
        _, name, scale, kw = model_args
        spec = make_spec(label, name, scale, p["size"], cats, **kw)
        seed = args.seed + sum(map(ord, label)) if seed is None else seed
        model = build(spec, seed) if init is None else load(init, device)[0]
        state = os.path.join(out, "ckpt", f"{label}.state.pt")  # resume point, until the stage is done
        loader = mask_loader() if name.startswith("maskrcnn") else train_loader
        det = engine.train_loop(model, loader, steps, p["lr"], device, seed,
                                [load(t, device)[0] for t in teachers], p["lam"], desc=label, log=log,
                                state=state, snapshots=snapshots, **train_opts(args))
        metrics = {**engine.evaluate(model, val_loader, device), "train_det_loss": det}
        save_ckpt(ckpt(label), model, spec, metrics)
        engine.discard(state)
        log({"event": "eval", "model": label, **metrics})
        print(f"{label:16s} AP {100 * metrics['AP']:5.1f}   ({(time.time() - t0) / 60:.1f} min)")
        return metrics

    # 1. the pool and the off-the-shelf student, trained from scratch
    s = p["student"]
    ots = ready("ots", s, p["student_steps"])
    pool = {lab: ready(lab, (lab, name, sc, kw), steps) for lab, name, sc, kw, steps in p["pool"]}
    weak = [lab for lab, m in pool.items() if m["AP"] <= ots["AP"]]
    if weak:
        print(f"note: teachers {weak} do not beat the student's AP {ots['AP']:.3f}; kept as candidates")
    # 2. adaptation costs and BGS
    cost_path = os.path.join(out, "cost.json")
    if os.path.isfile(cost_path):
        cost = json.load(open(cost_path))["cost"]
    else:
        models = {"ots": load(ckpt("ots"))[0], **{lab: load(ckpt(lab))[0] for lab in pool}}
        cost = engine.cost_matrix(models, data.CocoDetection(root, "train", masks=False), p["cost_images"], device)
        save_json(cost_path, {"cost": cost, "ap": {"ots": ots["AP"], **{k: v["AP"] for k, v in pool.items()}}})
    order = teacher_order(cost, "ots", {k: v["AP"] for k, v in pool.items()}, p["k"])
    save_json(os.path.join(out, "order.json"), {"student": "ots", "order": order})
    print(f"BGS order: {' -> '.join(order)}")
    # 3. MTPD and the baselines, all at a budget of len(order) stages
    budget = p["stage_steps"] * len(order)
    runs = {"ots": ots}
    S = p["stage_steps"]  # the long run keeps its weights at each MTPD stage boundary, for §3.5
    snaps = {k * S: os.path.join(out, "ckpt", f"long@{k * S}.pt") for k in range(1, len(order))}
    runs["long"] = ready("long", s, budget, init=ckpt("ots"), snapshots=snaps)
    runs["direct"] = ready("direct", s, budget, init=ckpt("ots"), teachers=[ckpt(order[-1])])
    runs["ensemble"] = ready("ensemble", s, budget, init=ckpt("ots"), teachers=[ckpt(t) for t in order])
    prev, stages = ckpt("ots"), []
    for i, t in enumerate(order):  # the progressive schedule (§3.2), each stage from the last one's weights
        label = f"mtpd_stage{i + 1}"
        stages.append({"teacher": t, **ready(label, s, p["stage_steps"], init=prev, teachers=[ckpt(t)])})
        prev = ckpt(label)
    runs["mtpd"] = {k: v for k, v in stages[-1].items() if k != "teacher"}
    model, spec, _ = load(prev)
    save(os.path.join(out, "student.pt"), model.state_dict())  # plain state_dict, no adapters
    save_json(os.path.join(out, "student_spec.json"), spec)
    results = {"preset": args.preset, "seed": args.seed, "cost": cost, "order": order,
               "teachers": pool, "stages": stages, "runs": runs, "budget_steps": budget}
    # 4. §3.5 for the longer-trained and the MTPD student: loss vs AP at each stage boundary, flatness
    def student_at(path):  # a checkpoint, or a snapshot of the long run (a bare state_dict)
        ck = engine.read(path)
        if "model" in ck:
            return load(path)[0]
        model = build(spec)
        model.load_state_dict(ck)
        return model

    start = [(0, ckpt("ots"), ots)]
    paths = {"long": start + [(k, f, None) for k, f in snaps.items() if os.path.isfile(f)]
             + [(budget, ckpt("long"), runs["long"])],
             "mtpd": start + [((i + 1) * S, ckpt(f"mtpd_stage{i + 1}"), st) for i, st in enumerate(stages)]}
    batches = analysis.fixed_batches(data.CocoDetection(root, "train", masks=False), *p["probe"])
    results["analysis"] = analysis.generalization_and_flatness(
        paths, {"long": ckpt("long"), "mtpd": prev}, student_at,
        lambda m: engine.evaluate(m, val_loader, device), batches, device=device, **p["landscape"])
    # 5. Table 2 (opt-in: n! orders)
    if args.all_orders:
        results["all_orders"] = every_order(args, ckpt("ots"), {t: ckpt(t) for t in order}, order, S, p["lr"],
                                            p["lam"], os.path.join(out, "orders"), train_loader, val_loader, log)
    results["wall_minutes"] = round((time.time() - t0) / 60, 2)
    save_json(os.path.join(out, "results.json"), results)
    log({"event": "done", "wall_minutes": results["wall_minutes"]})
    print("\nadaptation cost d(row -> column), fraction of the column's variance not explained:")
    names = list(cost)
    w = max(map(len, names)) + 2
    print(" " * w + "".join(f"{n:>{w}s}" for n in names))
    for a in names:
        print(f"{a:{w}s}" + "".join(f"{cost[a].get(b, 0.0):{w}.3f}" for b in names))
    print("\nteachers: " + ", ".join(f"{k} AP {100 * v['AP']:.1f}" for k, v in pool.items()))
    print(f"order: {' -> '.join(order)}; budget {budget} steps after OTS for each row below\n")
    print(table(runs))
    for name, fl in results["analysis"]["flatness"].items():
        print(f"{name}: loss {results['analysis']['landscape'][name]['loss0']:.3f}, mean rise "
              + ", ".join(f"{v:.3f} at r={r}" for r, v in fl.items()))
    if engine.is_main():
        print(f"report: {report.write_report(out, results)}")
    print(f"\nwall time {results['wall_minutes']:.1f} min; everything is in {out}/")
    return results


# ---------------------------------------------------------------------------------------------------------
# The other subcommands.
# ---------------------------------------------------------------------------------------------------------
def cmd_train(args):
    if args.model not in ZOO:
        fail(f"unknown model '{args.model}'; known models: {', '.join(ZOO)}")
    device = args.dev
    root = dataset_root(args)
    check_writable(args.out)
    train_loader, val_loader = loaders(args, root, args.batch, args.seed, masks=args.model.startswith("maskrcnn"))
    final, state = os.path.join(args.out, "model.pt"), os.path.join(args.out, "state.pt")
    if args.resume and os.path.isfile(final):
        print(f"{final} is complete; nothing to resume")
        return print(table({args.model: engine.read(final)["metrics"]}))
    size = max(train_loader.dataset.coco.imgs[i]["height"] for i in train_loader.dataset.ids)
    spec = make_spec(args.model, args.model, args.scale, args.min_size or size, train_loader.dataset.category_ids)
    model = build(spec, args.seed)
    steps = args.epochs * len(train_loader)
    det = engine.train_loop(model, train_loader, steps, args.lr, device, args.seed, desc=args.model, state=state,
                            **train_opts(args))
    metrics = {**engine.evaluate(model, val_loader, device), "train_det_loss": det}
    save_ckpt(final, model, spec, metrics)
    engine.discard(state)
    print(table({args.model: metrics}))


def cmd_eval(args):
    device = args.dev
    model, spec, _ = load(args.ckpt, device)
    root = dataset_root(args)
    _, val_loader = loaders(args, root, args.batch, 0, masks=False)
    metrics = engine.evaluate(model, val_loader, device, progress=True)
    print(table({spec["label"]: metrics}))
    if "mask_AP" in metrics:
        print(table({spec["label"] + " mask": {c: metrics["mask_" + c] for c in COLS}}))


def cmd_cost(args):
    device = args.dev
    loaded = [load(c, device) for c in args.ckpts]
    root = dataset_root(args)
    check_writable(args.out)
    models = {spec["label"]: m for m, spec, _ in loaded}
    cost = engine.cost_matrix(models, data.CocoDetection(root, "train", masks=False), args.images, device)
    save_json(args.out, {"cost": cost, "ap": {spec["label"]: met.get("AP") for _, spec, met in loaded}})
    print(json.dumps(cost, indent=1))


def cmd_order(args):
    if args.all:
        return cmd_order_all(args)
    if not args.cost or not args.student:
        fail("order needs --cost (a file written by `cost`) and --student, or --all with --ckpt-student "
             "and --teachers")
    try:
        f = json.load(open(args.cost))
    except (OSError, ValueError) as e:
        fail(f"cannot read cost file {args.cost}: {e}")
    if not isinstance(f, dict) or not isinstance(f.get("cost"), dict) or not isinstance(f.get("ap"), dict):
        fail(f"{args.cost} is not a cost file: it needs 'cost' and 'ap' (write one with `train.py cost`)")
    ap = {n: a for n, a in f["ap"].items() if n != args.student}
    print(" -> ".join(teacher_order(f["cost"], args.student, ap, args.k)))


def cmd_order_all(args):
    """order --all: every order of a small pool, ranked by final AP, with BGS's order marked (Table 2)."""
    if not args.ckpt_student or not args.teachers:
        fail("order --all needs --ckpt-student and --teachers (checkpoints)")
    if len(args.teachers) > 4:
        fail(f"order --all trains sum over l of n!/(n-l)! stages: give at most 4 teachers, not {len(args.teachers)}")
    device = args.dev
    student, sspec, _ = load(args.ckpt_student)
    teachers = {load(t)[1]["label"]: t for t in args.teachers}
    root = dataset_root(args)
    train_loader, val_loader = loaders(args, root, args.batch, args.seed, masks=sspec["name"].startswith("maskrcnn"))
    check_classes(sspec, [load(t)[1] for t in args.teachers], train_loader.dataset.category_ids)
    check_writable(args.out)
    models = {sspec["label"]: student, **{k: load(v)[0] for k, v in teachers.items()}}
    cost = engine.cost_matrix(models, data.CocoDetection(root, "train", masks=False), args.images, device)
    ap = {k: engine.read(v)["metrics"].get("AP") or engine.evaluate(models[k], val_loader, device)["AP"]
          for k, v in teachers.items()}
    bgs = teacher_order(cost, sspec["label"], ap, len(teachers))
    res = every_order(args, args.ckpt_student, teachers, bgs, args.steps, args.lr, args.lam, args.out,
                      train_loader, val_loader, engine.jsonl(os.path.join(args.out, "log.jsonl")))
    save_json(os.path.join(args.out, "all_orders.json"), res)
    for i, r in enumerate(res["rows"]):
        print(f"{i + 1:2d}. {' -> '.join(r['order']):40s} AP {100 * r['AP']:5.1f}" + ("   <- BGS" if r["order"] == bgs else ""))
    print(f"BGS order {' -> '.join(bgs)}: rank {res['bgs_rank'] or 'n/a (fewer teachers than the pool)'} "
          f"of {len(res['rows'])}")
    return res


def cmd_distill(args):
    device = args.dev
    student, sspec, _ = load(args.student, device)
    teachers = {}
    for path in args.teachers:
        m, spec, met = load(path, device)
        teachers[spec["label"]] = (path, m, met, spec)
    root = dataset_root(args)
    train_loader, val_loader = loaders(args, root, args.batch, args.seed, masks=sspec["name"].startswith("maskrcnn"))
    check_classes(sspec, [t[3] for t in teachers.values()], train_loader.dataset.category_ids)
    check_writable(args.out)
    log = engine.jsonl(os.path.join(args.out, "log.jsonl"))
    order_path = os.path.join(args.out, "order.json")
    if args.resume and os.path.isfile(order_path):  # the order this run already chose
        order = json.load(open(order_path))["order"]
    elif args.keep_order:
        order = list(teachers)
    else:
        ap = {k: met.get("AP") if met.get("AP") is not None else engine.evaluate(m, val_loader, device)["AP"]
              for k, (_, m, met, _) in teachers.items()}
        cost = engine.cost_matrix({sspec["label"]: student, **{k: v[1] for k, v in teachers.items()}},
                                  data.CocoDetection(root, "train", masks=False), args.images, device)
        save_json(os.path.join(args.out, "cost.json"), {"cost": cost, "ap": ap})
        order = teacher_order(cost, sspec["label"], ap, args.k)
    print(f"order: {' -> '.join(order)}")
    save_json(order_path, {"student": sspec["label"], "order": order})

    def run_stage(model, stage_teachers, i):
        done, state = os.path.join(args.out, f"stage{i + 1}.pt"), os.path.join(args.out, f"stage{i + 1}.state.pt")
        if args.resume and os.path.isfile(done):  # finished before the interruption
            ck = engine.read(done)
            model.load_state_dict(ck["model"])
            print(f"stage {i + 1} ({order[i]}): done earlier, AP {100 * ck['metrics']['AP']:.1f}")
            return ck["metrics"]
        det = engine.train_loop(model, train_loader, args.steps, args.lr, device, args.seed + i, stage_teachers,
                                args.lam, desc=f"stage {i + 1}", log=log, state=state, **train_opts(args))
        metrics = {**engine.evaluate(model, val_loader, device), "train_det_loss": det}
        save_ckpt(done, model, sspec, metrics)
        engine.discard(state)
        log({"event": "stage", "stage": i + 1, "teacher": order[i], **metrics})
        print(f"stage {i + 1} ({order[i]}): AP {100 * metrics['AP']:.1f}")
        return metrics

    mtpd.progressive_distillation(student, [teachers[t][1] for t in order], run_stage)
    save(os.path.join(args.out, "student.pt"), student.state_dict())
    save_json(os.path.join(args.out, "student_spec.json"), sspec)


def get_args_parser():
    ap = argparse.ArgumentParser(description="Multi-Teacher Progressive Distillation for torchvision detectors")
    sub = ap.add_subparsers(dest="cmd")

    def common(p, data_arg=True):
        if data_arg:
            p.add_argument("--data", help="COCO-format root (default: the built-in shapes benchmark)")
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
        p.add_argument("--seed", type=int, default=0, help="random seed (CPU runs are deterministic)")
        p.add_argument("--batch", type=int, default=8, help="images per batch (per process under torchrun)")
        p.add_argument("--workers", type=int, default=-1, help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
        p.add_argument("--fp32", action="store_true", help="on CUDA, turn off bf16 autocast and channels_last")
        p.add_argument("--compile", action="store_true", help="torch.compile the backbones (CUDA; slow start)")

    def resumable(p):
        p.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --out")
        p.add_argument("--ckpt-every", type=int, default=100, help="write the resume state every N iterations")

    p = sub.add_parser("train", help="train one detector from scratch")
    common(p)
    p.add_argument("--model", required=True, help=f"one of: {', '.join(ZOO)}")
    p.add_argument("--scale", type=float, default=1.0, help="input resolution factor (0.25..1)")
    p.add_argument("--min-size", type=int, default=0, help="base input size (default: the images' size)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--out", required=True, help="output folder (model.pt)")
    resumable(p)
    p = sub.add_parser("eval", help="COCO box (and mask) AP of a checkpoint")
    common(p)
    p.add_argument("--ckpt", required=True, help="checkpoint file")
    p = sub.add_parser("cost", help="adaptation-cost matrix between checkpoints (§3.2)")
    common(p)
    p.add_argument("--ckpts", nargs="+", required=True, help="two or more checkpoints")
    p.add_argument("--images", type=int, default=64, help="training images used (half fit, half held out)")
    p.add_argument("--out", required=True, help="output JSON file")
    p = sub.add_parser("order", help="teacher order by Backward Greedy Selection (Alg. 1), or every order")
    common(p)
    p.add_argument("--cost", help="cost JSON written by `cost`")
    p.add_argument("--student", help="the student's name in the cost file")
    p.add_argument("--k", type=int, default=3, help="at most this many teachers")
    p.add_argument("--all", action="store_true", help="distil through every order of --teachers (Table 2)")
    p.add_argument("--ckpt-student", help="with --all: the student checkpoint")
    p.add_argument("--teachers", nargs="+", help="with --all: 2-4 teacher checkpoints")
    p.add_argument("--steps", type=int, default=300, help="with --all: iterations per stage")
    p.add_argument("--lr", type=float, default=3e-4, help="with --all: AdamW learning rate")
    p.add_argument("--lam", type=float, default=1.0, help="with --all: weight of the feature loss")
    p.add_argument("--images", type=int, default=64, help="with --all: images for the adaptation costs")
    p.add_argument("--out", default="runs/orders", help="with --all: output folder")
    resumable(p)
    p = sub.add_parser("distill", help="progressive distillation of a student from teacher checkpoints")
    common(p)
    p.add_argument("--student", required=True, help="student checkpoint (the off-the-shelf student)")
    p.add_argument("--teachers", nargs="+", required=True, help="teacher checkpoints")
    p.add_argument("--k", type=int, default=3, help="at most this many teachers")
    p.add_argument("--keep-order", action="store_true", help="use the teachers in the given order, no BGS")
    p.add_argument("--steps", type=int, default=300, help="iterations per stage")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the feature loss")
    p.add_argument("--images", type=int, default=64, help="images for the adaptation costs")
    p.add_argument("--out", required=True, help="output folder")
    resumable(p)
    p = sub.add_parser("reproduce", help="the whole method and its baselines on the built-in benchmark")
    common(p, data_arg=False)
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="size of the run")
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--all-orders", action="store_true", help="also distil through every order of BGS's teachers")
    resumable(p)
    return ap


def main(argv=None):
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in logs
    args = get_args_parser().parse_args(argv)
    if args.cmd is None:
        args = get_args_parser().parse_args(["reproduce"] + (argv or []))
    args.data = getattr(args, "data", None)
    try:
        if getattr(args, "k", 1) < 1:
            fail(f"--k must be at least 1, got {args.k}")
        if getattr(args, "ckpt_every", 1) < 1:
            fail(f"--ckpt-every must be at least 1, got {args.ckpt_every}")
        if hasattr(args, "device"):
            args.dev = engine.init_distributed(args.device)  # one process, or one rank of torchrun
            if not engine.is_main():
                sys.stdout = open(os.devnull, "w")  # only rank 0 prints (errors still reach stderr)
        return {"train": cmd_train, "eval": cmd_eval, "cost": cmd_cost, "order": cmd_order,
                "distill": cmd_distill, "reproduce": cmd_reproduce}[args.cmd](args)
    except engine.InputError as e:  # bad input: one line, no traceback, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if engine.distributed():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
