"""mtpd's command line and all of its configuration, top to bottom: the configuration; data and checks; one
model's training (fit) and the progressive loop; Table 3 (`python train.py`); the other commands; main.

    python train.py                  # Table 3 on the built-in benchmark -> runs/default/
    python train.py train   --model retinanet_r18 --scale 0.5 --data ROOT --epochs 12 --out runs/student
    python train.py distill --student runs/student/model.pt --teachers a.pt b.pt --data ROOT --out runs/mtpd
"""
import argparse
import json
import os
import sys
import time

import torch
import torchvision

import data
import engine
import mechanisms
import models
import mtpd
from data import InputError, fail

# The configuration. ---------------------------------------------------------------------------------------
# The method (§3): lam weighs the feature loss, a fraction of the teacher's variance (mtpd.feature_loss;
# normalize False: the paper's plain mean squared error); inherit: copy the first teacher's neck and head
# into the student before stage 1 (the authors' code); k: at most this many teachers (BGS).
DISTILL = dict(lam=2.3, normalize=True, inherit=True, k=2)
# Every run: a fresh AdamW and LR schedule per stage (§3.2), linear warm-up, constant, x drop from drop_at
# of the iterations on, gradients clipped at the authors' max-norm; the resume state every ckpt_every.
RECIPE = dict(lr=3e-4, weight_decay=1e-4, warmup=50, drop_at=0.85, drop=0.1, clip=35.0, batch=8,
              ckpt_every=100)
MARGIN = 0.03  # a teacher must beat the longer-trained student by this much AP (Table 3's beat theirs by 3-7)
# torchvision's detection recipe (and its COCO weights'): input sizes and the finest anchor.
TORCHVISION_SIZES = dict(min_size=800, max_size=1333, anchor_base=32)


def model(label, name, scale, steps=None, **build):  # a preset's model; build: build_detector's kwargs
    return dict(label=label, name=name, scale=scale, steps=steps, build=build)


SMALL = dict(fpn_channels=128, head_convs=2)  # a light RetinaNet: at 128 px its head dominates the step
GN = dict(SMALL, head_gn=True)  # GroupNorm heads: from scratch the student converges in fewer iterations
# The built-in runs (RESULTS.md has what each gave): the images, the student and its schedule, the stages'
# length (the paper's: the student's schedule; the default's: half, for time), the teacher pool. tiny: tests.
PRESETS = {
    "tiny": dict(n_train=48, n_val=24, size=64, lr=1e-3, cost_images=16, student_steps=30, stage_steps=12,
                 student=model("student", "retinanet_r18", 0.5, **SMALL),
                 pool=[model("r18@1x", "retinanet_r18", 1.0, 30, **SMALL),
                       model("r34@1x", "retinanet_r34", 1.0, 30, **SMALL)]),
    "default": dict(n_train=800, n_val=200, size=128, lr=3e-4, cost_images=64, student_steps=800,
                    stage_steps=400, student=model("student", "retinanet_r18", 0.5, **SMALL),
                    pool=[model("r18@1x", "retinanet_r18", 1.0, 1000, **SMALL),
                          model("r50@1x", "retinanet_r50", 1.0, 600, **SMALL, zero_init_residual=True),
                          model("mrcnn_r18@1x", "maskrcnn_r18", 1.0, 200, fpn_channels=128)]),
    # the capacity gap (RESULTS.md): the same detector at 0.75x-2x the resolution, a deeper one, another kind
    "gap": dict(n_train=800, n_val=200, size=128, lr=3e-4, cost_images=64, student_steps=1000,
                stage_steps=1000, student=model("student", "retinanet_r18", 0.5, **GN),
                pool=[*(model(f"r18@{s}x", "retinanet_r18", s, 2000, **GN) for s in (0.75, 1, 1.5, 2)),
                      model("r50@1x", "retinanet_r50", 1.0, 2000, **GN, zero_init_residual=True),
                      model("fcos_r18@1x", "fcos_r18", 1.0, 2000, **SMALL)]),
}
# a converged OTS student (its learning curve plateaus by 5000 iterations; RESULTS.md)
PRESETS["converged"] = dict(PRESETS["default"], student_steps=5000, stage_steps=2500, pool=[
    dict(m, steps=1000) if m["label"] == "r50@1x" else m for m in PRESETS["default"]["pool"]])


# Data, models and checks. ---------------------------------------------------------------------------------
def data_root(args, preset="default"):  # --data, or the built-in benchmark (written once)
    if getattr(args, "data", None):
        if not os.path.isfile(os.path.join(args.data, "annotations", "instances_val2017.json")):
            fail(f"no COCO-format data at {args.data}: expected annotations/instances_{{train,val}}2017.json "
                 "and {train,val}2017/ (or leave out --data for the built-in benchmark)")
        return args.data
    p = PRESETS[preset]
    root = os.path.join("data", f"shapes{p['size']}_{p['n_train']}")
    if engine.is_main() and not os.path.isfile(os.path.join(root, "annotations", "instances_val2017.json")):
        stats = data.make_shapes(root, p["n_train"], p["n_val"], p["size"])
        print(f"wrote the shapes benchmark to {root}: {stats}")
    engine.barrier()
    return root


def loaders_for(args, root, name):  # (train, val) loaders for a model `name` (masks for a Mask R-CNN)
    workers = args.workers if args.workers >= 0 else (4 if args.dev.type == "cuda" else 0)
    return engine.loaders(root, args.batch, args.seed, name.startswith("maskrcnn"), args.dev, workers)


def check_writable(out):  # before any work: `out` can be written (nothing is created here)
    path = os.path.abspath(out)
    path = os.path.dirname(path) if os.path.isfile(path) else path  # a file named `out` is replaced
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        fail(f"cannot write the output {out}: {path} is not a writable folder; choose another --out")


def check_models(specs, categories=None):
    """Costs and orders are keyed by label, and distillation pairs models of one label space (the data's)."""
    labels = [s["label"] for s in specs]
    if len(set(labels)) < len(labels):
        fail(f"two models have the label '{next(x for x in labels if labels.count(x) > 1)}': train them "
             "with different `train --label` names")
    for s in specs[1:] + ([dict(label="the data", category_ids=list(categories))] if categories else []):
        if s["category_ids"] != specs[0]["category_ids"]:
            fail(f"{s['label']} has categories {s['category_ids']}, {specs[0]['label']} "
                 f"{specs[0]['category_ids']}: train every model on the same data")


def table(rows, cols=("AP", "AP50", "AP75", "APs", "APm", "APl")):
    lines = [f"{'run':18s}" + "".join(f"{c:>7s}" for c in cols)]
    lines += [f"{k:18s}" + "".join(f"{100 * m[c]:7.1f}" if m[c] >= 0 else "    n/a" for c in cols)  # -1: none
              for k, m in rows.items()]
    return "\n".join(lines)


# Training a model: one row of Table 3, one stage, or `train`. ---------------------------------------------
def fit(args, path, spec, model, root, steps, seed, teachers=(), inherit=False, mechanism="l2", init=None):
    """Train `model` (engine.train; distil it from `teachers`' checkpoints), evaluate it, save it to `path`
    with how it was made; one made so is reused, one made otherwise refused. -> the metrics."""
    label = lambda ckpt: engine.read(ckpt)["spec"]["label"]  # noqa: E731 (a model is known by its label)
    made = dict(steps=steps, seed=seed, spec={k: v for k, v in spec.items() if k != "label"}, lr=args.lr,
                mechanism=mechanism, precision=args.precision, init=init and label(init),
                teachers=[label(t) for t in teachers])
    if teachers:  # (`train` has no method flags: it never distils)
        made.update(lam=args.lam, normalize=args.normalize, inherit=inherit)
    if os.path.isfile(path):
        metrics = engine.read(path)["metrics"]
        if metrics.get("made") != made:
            fail(f"{path} was made otherwise ({metrics.get('made')}; now {made}): choose another --out, or "
                 "delete it to train it again")
        return metrics
    train_loader, val_loader = loaders_for(args, root, spec["name"])
    recipe = dict(RECIPE, lr=args.lr, precision=args.precision, ckpt_every=args.ckpt_every, made=made,
                  resume=args.resume, **{k: getattr(args, k, DISTILL[k]) for k in ("lam", "normalize")})
    log = jsonl(os.path.join(args.out, "log.jsonl"))
    out = engine.train(model, train_loader, steps, args.dev, seed, recipe,
                       [engine.load(t, args.dev)[0] for t in teachers], state=path[:-3] + ".state.pt",
                       log=log, desc=spec["label"], mechanism=mechanism, inherit_first=inherit)
    metrics = {**engine.evaluate(model, val_loader, args.dev, args.precision), **out, "made": made}
    engine.save_ckpt(path, model, spec, metrics)
    if engine.is_main() and os.path.isfile(path[:-3] + ".state.pt"):
        os.remove(path[:-3] + ".state.pt")
    log({"event": "eval", "model": spec["label"], **metrics})
    print(f"{spec['label']:18s} AP {100 * metrics['AP']:5.1f}")
    return metrics


def jsonl(path):
    def log(record):  # one JSON line per event (rank 0)
        if engine.is_main():
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 1), **record}) + "\n")
    return log


def progressive(args, prefix, student, order, teachers, out, root, mechs=None):
    """MTPD (§3.2): one stage per teacher of `order`, each from the student checkpoint the last one left,
    with fresh adapters and optimiser. teachers: {label: checkpoint}, or None (the same schedule without);
    mechanisms: one per stage (§3.4; default the L2). -> (the last checkpoint, [each stage's metrics])."""
    stages = []
    for i, teacher in enumerate(order):
        path = os.path.join(out, f"{prefix}stage{i + 1}.pt")
        model, spec, _ = engine.load(student, args.dev)
        spec = dict(spec, label=f"{prefix}stage{i + 1}")
        stages.append(fit(args, path, spec, model, root, args.stage_steps,
                          args.seed + sum(map(ord, f"mtpd_stage{i + 1}")),  # shared by MTPD and its control
                          [teachers[teacher]] if teachers else [], args.inherit and i == 0 and bool(teachers),
                          mechs[i] if mechs else "l2", init=student))
        student = path
    return student, stages


def export(path, out):
    """The student without adapters: a plain torchvision state_dict that loads strictly, and its spec."""
    model, spec, _ = engine.load(path)
    engine.save(os.path.join(out, "student.pt"), model.state_dict())
    engine.save(os.path.join(out, "student_spec.json"), spec)


# The subcommands. -----------------------------------------------------------------------------------------
def reproduce(args):
    """Table 3 on the built-in benchmark: the OTS student and the pool from scratch, the costs and BGS
    (§3.2), then at one budget `long` (no teacher), `long_restart`, `direct`, `ensemble` and MTPD."""
    p, t0 = PRESETS[args.preset], time.time()
    out = args.out = args.out or os.path.join("runs", args.preset)
    pool_dir, ckpts = args.pool or os.path.join(out, "ckpt"), os.path.join(out, "ckpt")
    check_writable(out)
    root = data_root(args, args.preset)
    args.lr, args.stage_steps = p["lr"], p["stage_steps"]
    cats = data.CocoDetection(root, "val", masks=False).category_ids
    same = args.seed + sum(map(ord, "direct"))  # the baselines share their batches

    def row(label, m, steps, seed, folder=ckpts, **kw):  # kw: init (a checkpoint), teachers, inherit
        spec = engine.make_spec(label, m["name"], m["scale"], p["size"], cats, **m["build"])
        net = engine.load(kw["init"], args.dev)[0] if kw.get("init") else engine.build(spec, seed)
        return fit(args, os.path.join(folder, f"{label}.pt"), spec, net, root, steps, seed, **kw)

    s, k, S = p["student"], args.k, args.stage_steps
    runs = {"ots": row("ots", s, p["student_steps"], args.seed + sum(map(ord, "ots")))}
    pool = {m["label"]: row(m["label"], m, m["steps"], sum(map(ord, m["label"])), pool_dir)  # seeds fixed
            for m in p["pool"]}
    teacher, ots = {t: os.path.join(pool_dir, f"{t}.pt") for t in pool}, os.path.join(ckpts, "ots.pt")
    runs["long"] = row("long", s, k * S, same, init=ots)  # as long as k stages
    kept = {t: m["AP"] for t, m in pool.items() if m["AP"] >= runs["long"]["AP"] + MARGIN}
    if not kept:
        fail(f"no teacher beats the longer-trained student ({100 * runs['long']['AP']:.1f} AP) by "
             f"{100 * MARGIN:.0f} points: train the pool longer")
    cost = engine.cost_matrix({name: engine.load(path)[0] for name, path in {"ots": ots, **teacher}.items()},
                              data.CocoDetection(root, "train", masks=False), p["cost_images"], args.dev)
    order = mtpd.backward_greedy_selection(cost, "ots", kept, k)
    print(f"teachers {', '.join(kept)} (of {', '.join(pool)}); BGS order: {' -> '.join(order)}")
    budget = S * len(order)  # every row's, after the OTS student
    if len(order) != k:
        runs["long"] = row(f"long_{len(order)}x", s, budget, same, init=ots)
    runs["long_restart"] = progressive(args, "long_restart_", ots, order, None, ckpts, root)[1][-1]
    runs["direct"] = row("direct", s, budget, same, init=ots, teachers=[teacher[order[-1]]],
                         inherit=args.inherit)
    runs["ensemble"] = row("ensemble", s, budget, same, init=ots, teachers=[teacher[t] for t in order],
                           inherit=args.inherit)
    last, stages = progressive(args, "mtpd_", ots, order, teacher, ckpts, root)
    runs["mtpd"] = stages[-1]
    export(last, out)
    settings = {k: getattr(args, k) for k in ("lam", "normalize", "inherit", "k", "stage_steps", "precision")}
    results = dict(preset=args.preset, seed=args.seed, pool=pool_dir, order=order, cost=cost, runs=runs,
                   teachers={t: m["AP"] for t, m in pool.items()}, settings=settings,
                   stages=[dict(m, teacher=t) for t, m in zip(order, stages)],
                   wall_minutes=round((time.time() - t0) / 60, 2))
    engine.save(os.path.join(out, "results.json"), results)
    print(f"\n{table(runs)}\n\nmtpd - direct {100 * (runs['mtpd']['AP'] - runs['direct']['AP']):+.1f} AP, "
          f"direct - long {100 * (runs['direct']['AP'] - runs['long']['AP']):+.1f}; "
          f"{results['wall_minutes']:.1f} min; everything is in {out}/")
    return results


def cmd_train(args):
    if args.model not in models.ZOO:
        fail(f"unknown model '{args.model}'; known models: {', '.join(models.ZOO)}")
    root = data_root(args)
    check_writable(args.out)
    ds = loaders_for(args, root, args.model)[0].dataset
    off = [k for k in TORCHVISION_SIZES if getattr(args, k) not in (0, TORCHVISION_SIZES[k])]
    if args.weights and not os.path.isfile(args.weights) and off:  # torchvision's weights: its sizes
        fail(f"--{off[0].replace('_', '-')} {getattr(args, off[0])} conflicts with {args.weights}, trained "
             f"with torchvision's {TORCHVISION_SIZES}; leave it out (or fine-tune from a file)")
    defaults = TORCHVISION_SIZES if args.data or args.weights and not os.path.isfile(args.weights) else dict(
        min_size=ds.coco.imgs[ds.ids[0]]["height"], max_size=0, anchor_base=0)  # the built-in images' size
    size = {k: getattr(args, k) or v for k, v in defaults.items()}
    spec = engine.make_spec(args.label or args.model, args.model, args.scale, size["min_size"],
                            ds.category_ids, size["max_size"], size["anchor_base"],
                            pretrained=args.weights or bool(args.weights_backbone))  # the weights' recipe
    net = engine.build(spec, args.seed)
    try:
        if args.weights:  # torchvision's COCO weights keep the data's categories' rows when the names agree
            try:
                names = torchvision.models.get_weight(args.weights).meta["categories"]
            except (ValueError, KeyError, AttributeError):
                names = []  # a file (or no such weights: load_weights says so)
            same = all(c < len(names) and names[c] == x.get("name") for c, x in ds.coco.cats.items())
            ids = ds.category_ids if same else None
            print(models.load_weights(net, args.weights, spec["num_classes"], ids))
        if args.weights_backbone:
            print(models.load_backbone_weights(net, args.weights_backbone))
    except ValueError as e:
        fail(str(e))
    world = torch.distributed.get_world_size() if engine.distributed() else 1
    steps = int(args.epochs * len(ds) // (args.batch * world))  # the batch is per process
    fit(args, os.path.join(args.out, "model.pt"), spec, net, root, steps, args.seed)


def cmd_distill(args):
    """BGS over fresh costs (or --keep-order), one stage per teacher (progressive), the plain student."""
    loaded = [engine.load(p, args.dev) for p in [args.student, *args.teachers]]  # (model, spec, metrics)
    check_models([spec for _, spec, _ in loaded])
    root = data_root(args)
    check_models([loaded[0][1]], loaders_for(args, root, loaded[0][1]["name"])[0].dataset.category_ids)
    check_writable(args.out)
    labels = {spec["label"]: p for p, (_, spec, _) in zip(args.teachers, loaded[1:])}
    if len(args.mechanism) not in (1, len(labels) if args.keep_order else 1):
        fail(f"--mechanism takes one mechanism, or one per teacher with --keep-order; got "
             f"{len(args.mechanism)}")
    order_file = os.path.join(args.out, "order.json")
    if args.resume and os.path.isfile(order_file):
        order = json.load(open(order_file))["order"]
    elif args.keep_order:
        order = list(labels)
    else:
        cost, ap = costs(args, loaded, root, os.path.join(args.out, "cost.json"))
        val = loaders_for(args, root, "")[1]
        ap = {spec["label"]: ap[spec["label"]] or engine.evaluate(m, val, args.dev, args.precision)["AP"]
              for m, spec, _ in loaded[1:]}
        order = mtpd.backward_greedy_selection(cost, loaded[0][1]["label"], ap, args.k)
    engine.save(order_file, {"order": order})
    print(f"order: {' -> '.join(order)}")
    mechs = args.mechanism * len(order) if len(args.mechanism) == 1 else args.mechanism
    last, _ = progressive(args, "", args.student, order, labels, args.out, root, mechs)
    export(last, args.out)


def cmd_eval(args):
    """COCOeval's summaries on the val split (box, and mask for Mask R-CNN); with --out the detections in
    COCO's results format."""
    model, spec, _ = engine.load(args.ckpt, args.dev)
    root = data_root(args)
    if args.out:
        check_writable(args.out)
    val = data.CocoDetection(root, "val", masks=False)
    check_models([spec], val.category_ids)
    loader = torch.utils.data.DataLoader(val, args.batch, collate_fn=data.collate)
    bbox, segm = data.predict(model, loader, val.category_ids, args.dev, args.precision, progress=True)
    for iou_type, results in {"bbox": bbox, "segm": segm}.items():
        if results or iou_type == "bbox":
            print(f"{spec['label']}: {iou_type}, {len(results)} detections on {len(val)} images\n"
                  f"{data.coco_summary(val.coco, results, iou_type)[1]}")
            if args.out:
                engine.save(os.path.join(args.out, f"detections_{iou_type}.json"), results)


def costs(args, loaded, root, path):
    """The adaptation costs of loaded checkpoints (§3.2), written to `path` with their APs. -> (cost, ap)"""
    cost = engine.cost_matrix({spec["label"]: m for m, spec, _ in loaded},
                              data.CocoDetection(root, "train", masks=False), args.images, args.dev)
    ap = {spec["label"]: met.get("AP") for _, spec, met in loaded}
    engine.save(path, {"cost": cost, "ap": ap})
    return cost, ap


def cmd_cost(args):
    loaded = [engine.load(c, args.dev) for c in args.ckpts]
    check_models([spec for _, spec, _ in loaded])
    root = data_root(args)
    check_writable(args.out)
    print(json.dumps(costs(args, loaded, root, args.out)[0], indent=1))


def cmd_order(args):
    try:
        f = json.load(open(args.cost))
        cost, ap = f["cost"], {k: v for k, v in f["ap"].items() if k != args.student}
        print(" -> ".join(mtpd.backward_greedy_selection(cost, args.student, ap, args.k)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"cannot order the teachers of {args.cost} (written by `train.py cost`?) for student "
             f"'{args.student}': {type(e).__name__} {e}")


# The command line. ----------------------------------------------------------------------------------------
def get_args_parser():
    ap = argparse.ArgumentParser(description="Multi-Teacher Progressive Distillation, torchvision detectors")
    sub, group = ap.add_subparsers(dest="cmd"), lambda: argparse.ArgumentParser(add_help=False)
    every, on_data, training, method = group(), group(), group(), group()
    every.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    every.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                       help="auto: bf16 where the device has it natively, fp16 on a GPU without, else fp32")
    every.add_argument("--seed", type=int, default=0, help="random seed (CPU runs are deterministic)")
    every.add_argument("--batch", type=int, default=RECIPE["batch"], help="images per batch (per process)")
    every.add_argument("--workers", type=int, default=-1, help="loader processes (default: 4 on CUDA, 0)")
    on_data.add_argument("--data", help="COCO-format folder (default: the built-in shapes benchmark)")
    training.add_argument("--resume", action="store_true", help="continue an interrupted run of this --out")
    training.add_argument("--ckpt-every", type=int, default=RECIPE["ckpt_every"],
                          help="write the resume state every N iterations (and at SIGTERM / SIGUSR1)")
    method.add_argument("--lam", type=float, default=DISTILL["lam"],
                        help="the feature loss's weight; the loss is a fraction of the teacher's variance")
    method.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=DISTILL["normalize"],
                        help="divide the L2 by the teacher's variance; --no-normalize: the paper's plain MSE")
    method.add_argument("--inherit", action=argparse.BooleanOptionalAction, default=DISTILL["inherit"],
                        help="copy the first teacher's neck and head into the student before stage 1")
    method.add_argument("--k", type=int, default=DISTILL["k"], help="at most this many teachers (BGS)")
    p = sub.add_parser("reproduce", parents=[every, training, method], help="Table 3 on the built-in data")
    p.add_argument("--preset", default="default", choices=list(PRESETS))
    p.add_argument("--out", help="run folder (default: runs/<preset>)")
    p.add_argument("--pool", help="the teacher pool's folder, trained there when missing (default: OUT/ckpt)")
    p = sub.add_parser("train", parents=[every, on_data, training], help="train one detector")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(models.ZOO)}")
    p.add_argument("--label", help="its name in costs and orders (default: --model)")
    p.add_argument("--scale", type=float, default=1.0, help="input resolution factor")
    p.add_argument("--min-size", type=int, default=0, help="shorter input side (default: 800 with --data or "
                   "--weights, as torchvision; else the built-in images' size)")
    p.add_argument("--max-size", type=int, default=0, help="longer input side (default: 1333, or --min-size)")
    p.add_argument("--anchor-base", type=int, default=0, help="finest anchor (default: 32 with --data or "
                   "--weights, as torchvision; else the built-in images' size / 8)")
    p.add_argument("--weights", help="torchvision's (RetinaNet_ResNet50_FPN_Weights.COCO_V1) or a file")
    p.add_argument("--weights-backbone", help="ImageNet weights (ResNet50_Weights.IMAGENET1K_V1) or a file")
    p.add_argument("--epochs", type=float, default=10, help="passes over the training split (0: evaluate)")
    p.add_argument("--lr", type=float, default=RECIPE["lr"], help="AdamW's learning rate")
    p.add_argument("--out", required=True, help="output folder (model.pt)")
    p = sub.add_parser("distill", parents=[every, on_data, training, method], help="MTPD from checkpoints")
    p.add_argument("--student", required=True, help="the off-the-shelf student's checkpoint")
    p.add_argument("--teachers", nargs="+", required=True, help="teacher checkpoints")
    p.add_argument("--keep-order", action="store_true", help="the teachers in the order given, not BGS's")
    p.add_argument("--mechanism", nargs="+", default=["l2"], choices=mechanisms.NAMES,
                   help="the feature loss of every stage, or one per stage with --keep-order (§3.4)")
    p.add_argument("--steps", dest="stage_steps", type=int, default=PRESETS["default"]["stage_steps"],
                   help="iterations per stage (default %(default)s)")
    p.add_argument("--lr", type=float, default=RECIPE["lr"], help="AdamW's learning rate")
    p.add_argument("--images", type=int, default=PRESETS["default"]["cost_images"], help="images, the costs")
    p.add_argument("--out", required=True, help="output folder")
    p = sub.add_parser("eval", parents=[every, on_data], help="COCOeval summaries and detections")
    p.add_argument("--ckpt", required=True, help="checkpoint file")
    p.add_argument("--out", help="folder for detections_bbox.json (and _segm.json)")
    p = sub.add_parser("cost", parents=[every, on_data], help="the adaptation costs of checkpoints (§3.2)")
    p.add_argument("--ckpts", nargs="+", required=True, help="two or more checkpoints")
    p.add_argument("--images", type=int, default=PRESETS["default"]["cost_images"],
                   help="training images (half fit, half held out)")
    p.add_argument("--out", required=True, help="output JSON file")
    p = sub.add_parser("order", help="the teacher order by BGS (Alg. 1) from a cost file")
    p.add_argument("--cost", required=True, help="a JSON file written by `cost`")
    p.add_argument("--student", required=True, help="the student's label in it")
    p.add_argument("--k", type=int, default=DISTILL["k"], help="at most this many teachers")
    return ap


def main(argv=None, command=None):
    """Parse argv (bare flags are reproduce's) and run its command, or `command(args)`: bad input stops with
    one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if not argv or argv[0] not in ("reproduce", "train", "distill", "eval", "cost", "order", "-h", "--help"):
        argv = ["reproduce", *argv]  # `python train.py --seed 1`
    args = get_args_parser().parse_args(argv)
    try:
        for flag in ("k", "ckpt_every", "stage_steps", "batch"):
            if getattr(args, flag, 1) < 1:
                fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
        if args.cmd != "order":
            args.dev = engine.init_distributed(args.device)
            if not engine.is_main():
                sys.stdout = open(os.devnull, "w")  # only rank 0 prints
            args.precision, why = engine.choose_precision(args.dev, args.precision)
            print(f"precision {args.precision}: {why}")
        commands = dict(reproduce=reproduce, train=cmd_train, distill=cmd_distill, eval=cmd_eval,
                        cost=cmd_cost, order=cmd_order)
        return (command or commands[args.cmd])(args)
    except InputError as e:  # bad input: one line, no traceback, exit code 2
        print(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)
    finally:
        if engine.distributed():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
