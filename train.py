"""mtpd command line: train, eval, cost, order, distill, reproduce. All configuration lives in this file.

    python train.py                      # = reproduce --preset default: the whole method on built-in data
    python train.py --seeds 0 1 2        # every row for three seeds (one shared pool), mean and spread
    python train.py reproduce --preset tiny --out runs/tiny
    python train.py train --model retinanet_r18 --scale 0.5 --out runs/r18
    python train.py cost --ckpts a.pt b.pt c.pt --out cost.json
    python train.py order --cost cost.json --student a --k 3
    python train.py distill --student a.pt --teachers b.pt c.pt [--inherit] --out runs/distill
"""
import argparse
import json
import os
import sys

import torch
import torchvision

import data
import engine
import mechanisms
import models
import mtpd
import reproduce
from engine import (build, check_classes, check_labels, check_writable, load, make_spec, save,
                    save_json, teacher_order)
from models import ZOO
from report import table

# ---------------------------------------------------------------------------------------------------------
# The method's defaults, the training recipe of every run, and the presets of `reproduce`.
# ---------------------------------------------------------------------------------------------------------
# The method's settings, stated once: every subcommand uses them unless a flag (or a preset that says why)
# overrides them. lam: the feature loss's weight; mtpd.feature_loss divides the paper's plain L2 by the
# teacher's feature variance in the batch, so lam = 1 weighs the fraction of it the student misses, the
# order of the detection loss. inherit: copy the first teacher's neck and head into the student before
# stage 1 (the authors' code). k: at most this many teachers (BGS, Alg. 1). adapter: 'auto' (identity where
# the widths match, §3.1), 'conv' (a learned 1x1 conv) or 'lstsq' (a 1x1 conv started at the least-squares
# map the adaptation cost fits; not in the paper). The default preset's values (RESULTS.md).
DISTILL = dict(lam=3.0, inherit=True, k=2, adapter="auto")

# Every stage gets a fresh AdamW and LR schedule (§3.2): linear warm-up, constant, x `drop` from `drop_at`
# of the iterations on (from scratch, decaying early hurts), gradients clipped at the official recipe's
# max-norm. published: the mechanisms' published loss weights. precision, fused, cache, cache_gib, every,
# resume: how it runs (engine.train_loop); the command line sets them (--precision auto resolves to what
# the device computes natively: engine.choose_precision), and --lr, --lam, --adapter override the rest.
RECIPE = dict(lr=3e-4, weight_decay=1e-4, warmup=50, drop_at=0.85, drop=0.1, clip=35.0,
              lam=DISTILL["lam"], adapter=DISTILL["adapter"], adapter_images=64, published=False,
              precision="fp32", fused=True, cache=True, cache_gib=2.0, every=100, resume=False)


def model(label, name, scale, steps=None, **build):
    """A model of a preset: its label, zoo name, input scale, training iterations (pool), build kwargs."""
    return dict(label=label, name=name, scale=scale, steps=steps, build=build)


SMALL = dict(fpn_channels=128, head_convs=2)  # a light RetinaNet: at 128 px its head dominates the step
# A preset is DISTILL plus the run's size (train.py reproduce --preset; RESULTS.md has what each took).
PRESETS = {
    # every step of the reproduction in about a minute on 2 CPU cores, at lam 1 (its first setting: the
    # tests compare its numbers across changes)
    "tiny": dict(n_train=48, n_val=24, size=64, batch=8, lr=1e-3, lam=1.0, cost_images=16,
                 student=model("student", "retinanet_r18", 0.5, **SMALL), student_steps=30, stage_steps=12,
                 probe=(1, 8), landscape=dict(points=5, dirs_1d=1, points_2d=3),
                 pool=[model("r18@1x", "retinanet_r18", 1.0, 30, **SMALL),
                       model("r34@1x", "retinanet_r34", 1.0, 30, **SMALL)]),
    # The paper's protocol (Table 3) scaled to 2 CPU cores: k stages, the rows at the same budget, a teacher
    # must beat the longer-trained student by `margin` AP. A stage is half the OTS schedule, since each
    # OTS-length stage would take the run past 30 minutes (a converged OTS student is the `converged`
    # preset, below).
    "default": dict(n_train=800, n_val=200, size=128, batch=8, lr=3e-4, cost_images=64, margin=0.03,
                    student=model("student", "retinanet_r18", 0.5, **SMALL), student_steps=800,
                    stage_steps=400, probe=(4, 8), landscape=dict(points=11, dirs_1d=3, points_2d=7),
                    pool=[model("r18@1x", "retinanet_r18", 1.0, 1000, **SMALL),
                          model("r50@1x", "retinanet_r50", 1.0, 600, **SMALL, zero_init_residual=True),
                          model("mrcnn_r18@1x", "maskrcnn_r18", 1.0, 200, fpn_channels=128)]),
    # Needs a GPU: a Swin teacher, which a CPU cannot train well in minutes (RESULTS.md), and full-width
    # heads; lam 1, its first setting (not measured on a GPU since).
    "gpu": dict(n_train=8000, n_val=500, size=256, batch=16, lr=3e-4, lam=1.0, cost_images=256, margin=0.03,
                student=model("student", "retinanet_r18", 0.5), student_steps=10000, stage_steps=5000,
                probe=(8, 16), landscape=dict(points=21, dirs_1d=3, points_2d=11),
                pool=[model("r18@1x", "retinanet_r18", 1.0, 10000),
                      model("r50@1x", "retinanet_r50", 1.0, 15000, zero_init_residual=True),
                      model("maskrcnn_r50@1x", "maskrcnn_r50", 1.0, 15000, zero_init_residual=True),
                      model("swin_t@1x", "retinanet_swin_t", 1.0, 20000)]),
}
# The capacity-gap study (RESULTS.md, "Does a capacity gap show MTPD's premise?"): the default's student
# and data with GroupNorm in every RetinaNet head (the student converges in fewer iterations), each stage
# as long as the OTS schedule (the paper's protocol), and a pool with stronger and farther teachers: the
# same detector at 0.75x to 2x the resolution (Table 4's ladder: the student is at 0.5x), a deeper one
# and another family. `premise`: every teacher of the pool is also distilled directly (Fig. 1), and MTPD
# also runs through the forward-greedy order.
GN = dict(SMALL, head_gn=True)
PRESETS["gap"] = dict(PRESETS["default"], premise=True, student=model("student", "retinanet_r18", 0.5, **GN),
                      student_steps=1000, stage_steps=1000,
                      pool=[model("r18@0.75x", "retinanet_r18", 0.75, 2000, **GN),
                            model("r18@1x", "retinanet_r18", 1.0, 2000, **GN),
                            model("r18@1.5x", "retinanet_r18", 1.5, 2000, **GN),
                            model("r18@2x", "retinanet_r18", 2.0, 2000, **GN),
                            model("r50@1x", "retinanet_r50", 1.0, 2000, **GN, zero_init_residual=True),
                            model("fcos_r18@1x", "fcos_r18", 1.0, 2000, **SMALL)])
# The default with a converged OTS student: 5000 iterations, where its learning curve has plateaued and the
# LR drop has been taken; every schedule of the student is 6.25x the default's (a stage is half the OTS
# schedule, as in the default), and R50@1x trains 1000 iterations so that it beats the longer-trained
# student: the regime of the paper's Table 3, where training longer adds little (RESULTS.md).
PRESETS["converged"] = dict(PRESETS["default"], student_steps=5000, stage_steps=2500,
                            pool=[dict(m, steps=1000) if m["label"] == "r50@1x" else m
                                  for m in PRESETS["default"]["pool"]])
PRESETS = {name: {**DISTILL, **p} for name, p in PRESETS.items()}


fail = engine.fail  # raises engine.InputError; main() prints it as one line and exits with code 2


# ---------------------------------------------------------------------------------------------------------
# Data, models and checkpoints.
# ---------------------------------------------------------------------------------------------------------
def dataset_root(args, split="train"):
    """--data, or the embedded shapes benchmark (generated once, next to the runs)."""
    if args.data:
        if not os.path.isfile(os.path.join(args.data, "annotations", f"instances_{split}2017.json")):
            fail(f"no COCO-format data at {args.data}: expected annotations/instances_{split}2017.json "
                 f"and {split}2017/ (or leave out --data to use the built-in shapes benchmark)")
        return args.data
    p = PRESETS[getattr(args, "preset", None) or "default"]
    root = os.path.join("data", f"shapes{p['size']}_{p['n_train']}")
    if engine.is_main() and not os.path.isfile(os.path.join(root, "annotations", "instances_val2017.json")):
        stats = data.make_shapes(root, p["n_train"], p["n_val"], p["size"], seed=0)
        print(f"wrote the shapes benchmark to {root}: {json.dumps(stats)}")
    engine.barrier()  # under torchrun, rank 0 writes it and the others wait
    return root


def recipe(args, **run):
    """RECIPE with this command's flags: the precision main() chose (engine.choose_precision), the feature
    cache (--no-cache) and its size, the resume state every --ckpt-every iterations (continued with
    --resume), and `run` (lr, lam, ...)."""
    return dict(RECIPE, precision=args.precision, cache=args.cache, cache_gib=args.cache_gib,
                every=getattr(args, "ckpt_every", 0),
                resume=getattr(args, "resume", False), **run)


def workers(args):
    return args.workers if args.workers >= 0 else (4 if args.device == "cuda" else 0)


def loaders(args, root, batch, seed, masks):
    return engine.loaders(root, batch, seed, masks, args.dev, workers(args))


# ---------------------------------------------------------------------------------------------------------
# The subcommands. reproduce is the paper's experiment on the built-in data (reproduce.py).
# ---------------------------------------------------------------------------------------------------------
def cmd_reproduce(args):
    p = PRESETS[args.preset]
    out = args.out or os.path.join("runs", args.preset)
    check_writable(out)
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        fail(f"--seeds must be different from each other, got {args.seeds}")
    flags = (("lam", args.lam), ("inherit", args.inherit), ("adapter", args.adapter),
             ("stage_steps", args.stage_steps))
    p = dict(p, **{k: v for k, v in flags if v is not None})
    if p["stage_steps"] < 1:
        fail(f"--stage-steps must be at least 1, got {p['stage_steps']}")
    if args.premise:  # the teachers to distil directly (Fig. 1), or all of them
        labels = [m["label"] for m in p["pool"]]
        unknown = [t for t in args.premise if t not in labels + ["all"]]
        if unknown:
            fail(f"--premise: {', '.join(unknown)} not in the {args.preset} preset's pool "
                 f"({', '.join(labels)}); name teachers of it, or 'all'")
        p["premise"] = True if "all" in args.premise else list(args.premise)
    root = dataset_root(args)  # after the checks: a bad flag writes nothing
    return reproduce.reproduce(p, args.preset, out, root,
                               lambda b, masks, seed: loaders(args, root, b, seed, masks),
                               args.dev, args.seeds or [args.seed],
                               recipe(args, lr=p["lr"], lam=p["lam"], adapter=p["adapter"],
                                      published=args.published_weights),
                               args.mechanism, args.all_orders)


def cmd_train(args):
    if args.model not in ZOO:
        fail(f"unknown model '{args.model}'; known models: {', '.join(ZOO)}")
    device = args.dev
    root = dataset_root(args)
    check_writable(args.out)
    train_loader, val_loader = loaders(args, root, args.batch, args.seed,
                                       masks=args.model.startswith("maskrcnn"))
    final = os.path.join(args.out, "model.pt")
    if args.resume and os.path.isfile(final):
        print(f"{final} is complete; nothing to resume")
        return print(table({args.model: engine.read(final)["metrics"]}))
    ds = train_loader.dataset
    sizes = input_sizes(args, ds)
    spec = make_spec(args.label or args.model, args.model, args.scale, sizes["min_size"], ds.category_ids,
                     max_size=sizes["max_size"], anchor_base=sizes["anchor_base"],
                     # torchvision's fine-tuning recipe
                     pretrained=bool(args.weights or args.weights_backbone))
    model = build(spec, args.seed)
    try:  # torchvision's COCO weights keep their rows of the data's categories when the names agree
        if args.weights:
            print(models.load_weights(model, args.weights, spec["num_classes"],
                                      ds.category_ids if coco_indexed(args.weights, ds.coco.cats) else None))
        if args.weights_backbone:
            print(models.load_backbone_weights(model, args.weights_backbone))
    except ValueError as e:
        fail(str(e))
    metrics = engine.fit(model, spec, final, train_loader, val_loader, args.epochs * len(train_loader),
                         device, args.seed, recipe(args, lr=args.lr), desc=args.model)
    print(table({args.model: metrics}))


# torchvision's detection recipe: the transform's sizes and the finest anchor of its builders (RetinaNet
# 32..512 with 3 scales, FCOS 8..128, Faster/Mask R-CNN 32..512), which their COCO weights were trained with.
TORCHVISION_SIZES = dict(min_size=800, max_size=1333, anchor_base=32)


def input_sizes(args, ds):
    """min_size, max_size and anchor_base of a model `train` builds. With torchvision weights by name, those
    of torchvision's builder (a flag that disagrees is refused); on --data, torchvision's recipe where no
    flag is given; on the built-in benchmark, its square images' size and anchors from size / 8."""
    flags = {k: getattr(args, k) for k in TORCHVISION_SIZES if getattr(args, k)}
    if args.weights and not os.path.isfile(args.weights):
        off = {k: v for k, v in flags.items() if v != TORCHVISION_SIZES[k]}
        if off:
            k, v = next(iter(off.items()))
            fail(f"--{k.replace('_', '-')} {v} conflicts with {args.weights}, which torchvision trained with "
                 f"{k.replace('_', ' ')} {TORCHVISION_SIZES[k]}; leave it out (or fine-tune from a file)")
        return dict(TORCHVISION_SIZES)
    if args.data:
        return {**TORCHVISION_SIZES, **flags}
    size = flags.get("min_size") or max(ds.coco.imgs[i]["height"] for i in ds.ids)
    return dict(min_size=size, max_size=flags.get("max_size", size),
                anchor_base=flags.get("anchor_base", size // 8))


def coco_indexed(source, cats):
    """Whether `source` is torchvision weights whose class rows are category ids with the data's names."""
    try:
        names = torchvision.models.get_weight(source).meta["categories"]
    except (ValueError, KeyError, AttributeError):
        return False
    return all(c < len(names) and names[c] == cat.get("name") for c, cat in cats.items())


def cmd_eval(args):
    """COCOeval's 12-line summaries of a checkpoint on the val split (box, and mask for Mask R-CNN);
    with --out the detections in COCO results format (original category ids); then single-image
    latency."""
    if engine.distributed():
        fail("eval runs in one process (it writes whole detection files and times single images): "
             "run it without torchrun")
    device = args.dev
    model, spec, _ = load(args.ckpt, device)
    root = dataset_root(args, "val")
    if args.out:
        check_writable(args.out)
    try:  # the val split only: COCO's train annotations take a minute and GBs of memory to read
        ds = data.CocoDetection(root, "val", masks=False)
    except ValueError as e:
        fail(str(e))
    val_loader = torch.utils.data.DataLoader(ds, args.batch, collate_fn=data.collate,
                                             num_workers=workers(args))
    if ds.category_ids != spec["category_ids"]:
        fail(f"{args.ckpt} was trained on categories {spec['category_ids']}, the data at {root} has "
             f"{ds.category_ids}: evaluate on data of the same categories")
    model.to(memory_format=engine.memory_format(args.precision))
    bbox, segm = data.predict(model, val_loader, ds.category_ids, device, progress=True,
                              precision=args.precision)
    kinds = {"bbox": bbox, "segm": segm} if spec["name"].startswith("maskrcnn") else {"bbox": bbox}
    for iou_type, results in kinds.items():
        _, text = data.coco_summary(ds.coco, results, iou_type, text=True)
        print(f"{spec['label']}: {iou_type}, {len(results)} detections on {len(ds)} val images\n{text}")
        if args.out:
            data.write_results(os.path.join(args.out, f"detections_{iou_type}.json"), results)
    if args.out:
        print(f"wrote {', '.join(f'detections_{k}.json' for k in kinds)} to {args.out}")
    ms = data.latency(model, val_loader, device, precision=args.precision)
    print(f"latency: {ms:.1f} ms/image (median of 20 single-image forward passes after 3 warm-up ones, "
          f"{device.type}, {args.precision}, batch 1)")


def cmd_cost(args):
    device = args.dev
    loaded = [load(c, device) for c in args.ckpts]
    check_labels([spec["label"] for _, spec, _ in loaded])
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
        fail(f"order --all trains sum over l of n!/(n-l)! stages: "
             f"give at most 4 teachers, not {len(args.teachers)}")
    device = args.dev
    student, sspec, _ = load(args.ckpt_student)
    loaded = {path: load(path) for path in args.teachers}  # (model, spec, metrics)
    check_labels([sspec["label"]] + [spec["label"] for _, spec, _ in loaded.values()])
    teachers = {spec["label"]: path for path, (_, spec, _) in loaded.items()}
    root = dataset_root(args)
    train_loader, val_loader = loaders(args, root, args.batch, args.seed,
                                       masks=sspec["name"].startswith("maskrcnn"))
    check_classes(sspec, [spec for _, spec, _ in loaded.values()], train_loader.dataset.category_ids)
    check_writable(args.out)
    rec = recipe(args, lr=args.lr, lam=args.lam, adapter=args.adapter)
    # before the costs: a wrong --out fails fast
    reproduce.check_setup(args.out, args.ckpt_student, teachers, args.steps, args.lr, args.lam, args.seed,
                          args.inherit, args.adapter, args.precision)
    models = {sspec["label"]: student, **{spec["label"]: m for m, spec, _ in loaded.values()}}
    cost = engine.cost_matrix(models, data.CocoDetection(root, "train", masks=False), args.images, device)
    ap = {spec["label"]: met["AP"] if met.get("AP") is not None else
          engine.evaluate(m, val_loader, args.dev, args.precision)["AP"] for m, spec, met in loaded.values()}
    bgs = teacher_order(cost, sspec["label"], ap, len(teachers))
    res = reproduce.every_order(args.ckpt_student, teachers, bgs, args.steps, args.out, train_loader,
                                val_loader, engine.jsonl(os.path.join(args.out, "log.jsonl")), args.dev,
                                args.seed, rec, args.inherit)
    save_json(os.path.join(args.out, "all_orders.json"), res)
    for i, r in enumerate(res["rows"]):
        mark = "   <- BGS" if r["order"] == bgs else ""
        print(f"{i + 1:2d}. {' -> '.join(r['order']):40s} AP {100 * r['AP']:5.1f}{mark}")
    print(f"BGS order {' -> '.join(bgs)}: rank {res['bgs_rank'] or 'n/a (fewer teachers than the pool)'} "
          f"of {len(res['rows'])}")
    return res


def cmd_distill(args):
    """Progressive distillation of a student checkpoint: BGS orders the teachers (or --keep-order), then one
    stage per teacher (mtpd.progressive_distillation), each written to --out/stage<i>.pt; the student
    without adapters is --out/student.pt."""
    student, sspec, _ = load(args.student, args.dev)
    loaded = [(path, *load(path, args.dev)) for path in args.teachers]
    check_labels([sspec["label"]] + [spec["label"] for _, _, spec, _ in loaded])
    teachers = {spec["label"]: (path, m, met, spec) for path, m, spec, met in loaded}
    root = dataset_root(args)
    train_loader, val_loader = loaders(args, root, args.batch, args.seed,
                                       masks=sspec["name"].startswith("maskrcnn"))
    check_classes(sspec, [t[3] for t in teachers.values()], train_loader.dataset.category_ids)
    check_writable(args.out)
    if len(args.mechanism) > 1 and (not args.keep_order or len(args.mechanism) != len(teachers)):
        fail(f"--mechanism takes one mechanism, or one per stage with --keep-order ({len(teachers)} stages), "
             f"not {len(args.mechanism)}: BGS decides how many stages there are")
    order, mech = distill_order(args, student, sspec, teachers, root, val_loader)
    log = engine.jsonl(os.path.join(args.out, "log.jsonl"))
    stage_recipe = recipe(args, lr=args.lr, lam=args.lam, adapter=args.adapter,
                          published=args.published_weights)

    def run_stage(model, teacher, i):
        done = os.path.join(args.out, f"stage{i + 1}.pt")
        if args.resume and os.path.isfile(done):  # finished before the interruption
            ck = engine.read(done)
            model.load_state_dict(ck["model"])
            print(f"stage {i + 1} ({order[i]}): done earlier, AP {100 * ck['metrics']['AP']:.1f}")
            return model, ck["metrics"]
        metrics = engine.fit(model, sspec, done, train_loader, val_loader, args.steps, args.dev,
                             args.seed + i, stage_recipe, [teacher], desc=f"stage {i + 1}", log=log,
                             mechanism=mech[i], inherit_first=args.inherit and i == 0)
        log({"event": "stage", "stage": i + 1, "teacher": order[i], **metrics})
        print(f"stage {i + 1} ({order[i]}): AP {100 * metrics['AP']:.1f}")
        return model, metrics

    mtpd.progressive_distillation(student, [teachers[t][1] for t in order], run_stage)
    save(os.path.join(args.out, "student.pt"), student.state_dict())
    save_json(os.path.join(args.out, "student_spec.json"), sspec)


def distill_order(args, student, sspec, teachers, root, val_loader):
    """distill's teachers in order and each stage's mechanism: the order this --out already chose
    (--resume), the given one (--keep-order) or BGS's over fresh adaptation costs; recorded in
    --out/order.json with the settings a resumed run must share. -> (order, mechanisms)."""
    order_path = os.path.join(args.out, "order.json")
    saved = {}
    if args.resume and os.path.isfile(order_path):  # the order this run already chose
        saved = json.load(open(order_path))
        order = saved["order"]
    elif args.keep_order:
        order = list(teachers)
    else:
        ap = {k: (met.get("AP") if met.get("AP") is not None
                  else engine.evaluate(m, val_loader, args.dev, args.precision)["AP"])
              for k, (_, m, met, _) in teachers.items()}
        cost = engine.cost_matrix({sspec["label"]: student, **{k: v[1] for k, v in teachers.items()}},
                                  data.CocoDetection(root, "train", masks=False), args.images, args.dev)
        save_json(os.path.join(args.out, "cost.json"), {"cost": cost, "ap": ap})
        order = teacher_order(cost, sspec["label"], ap, args.k)
    if len(args.mechanism) not in (1, len(order)):
        fail(f"--mechanism takes one mechanism, or one per stage ({len(order)}), not {len(args.mechanism)}")
    mech = args.mechanism * len(order) if len(args.mechanism) == 1 else args.mechanism
    chosen = {"mechanisms": mech, "published": args.published_weights, "lam": args.lam,
              "inherit": args.inherit, "adapter": args.adapter, "steps": args.steps,
              "precision": args.precision}
    if any(saved.get(k, v) != v for k, v in chosen.items()):
        fail(f"{args.out} was started with other --mechanism / --published-weights / --lam / --inherit "
             "/ --adapter / --steps / --precision: resume with the same")
    print(f"order: {' -> '.join(f'{t} ({m})' for t, m in zip(order, mech))}")
    save_json(order_path, {"student": sspec["label"], "order": order, **chosen})
    return order, mech


def get_args_parser():
    ap = argparse.ArgumentParser(description="Multi-Teacher Progressive Distillation "
                                             "for torchvision detectors")
    sub = ap.add_subparsers(dest="cmd")

    def parent():
        return argparse.ArgumentParser(add_help=False)

    run = parent()  # every command
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    run.add_argument("--seed", type=int, default=0, help="random seed (CPU runs are deterministic)")
    run.add_argument("--batch", type=int, default=8, help="images per batch (per process under torchrun)")
    run.add_argument("--workers", type=int, default=-1,
                     help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    run.add_argument("--precision", default="auto", choices=engine.PRECISIONS,
                     help="auto (default): bf16 where the device computes it natively, fp16 + GradScaler "
                          "on a GPU without bf16, else float32; one line at start says which runs and why")
    run.add_argument("--cache", action=argparse.BooleanOptionalAction, default=RECIPE["cache"],
                     help="cache each teacher's features per (image, flip) instead of a forward per step "
                          "(L2, one image size, flip only); --no-cache runs the teacher at every step")
    run.add_argument("--cache-gib", type=float, default=RECIPE["cache_gib"],
                     help="memory for one teacher's cached features (default 2 GiB)")
    data_arg = parent()
    data_arg.add_argument("--data", help="COCO-format root (default: the built-in shapes benchmark)")
    training = parent()  # the commands that train
    training.add_argument("--resume", action="store_true",
                          help="continue an interrupted run in the same --out")
    training.add_argument("--ckpt-every", type=int, default=RECIPE["every"],
                          help="write the resume state every N iterations")
    lr = parent()
    lr.add_argument("--lr", type=float, default=RECIPE["lr"], help="AdamW learning rate")
    distilling = parent()  # the commands that distil a given student
    distilling.add_argument("--steps", type=int, default=PRESETS["default"]["stage_steps"],
                            help="iterations per stage (default: %(default)s, the default preset's)")
    distilling.add_argument("--lam", type=float, default=DISTILL["lam"],
                            help="weight of the feature loss, a fraction of the teacher's feature variance "
                                 "(mtpd.feature_loss; default: %(default)s)")
    distilling.add_argument("--images", type=int, default=64, help="training images for the adaptation costs")

    def inherit_adapter(p, method=True):  # method False: the preset's
        p.add_argument("--inherit", action=argparse.BooleanOptionalAction,
                       default=DISTILL["inherit"] if method else None,
                       help="before stage 1, copy the first teacher's neck and head into the student "
                            "(authors' code); --no-inherit starts from the student's own "
                            "(default: %(default)s)")
        p.add_argument("--adapter", choices=["auto", "conv", "lstsq"],
                       default=DISTILL["adapter"] if method else None,
                       help="auto: identity where the widths match (§3.1); conv: always a learned 1x1 conv; "
                            "lstsq: a 1x1 conv that starts at the least-squares map the adaptation cost fits "
                            "(not in the paper; default: %(default)s)")

    p = sub.add_parser("train", parents=[run, data_arg, training, lr], help="train one detector from scratch")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(ZOO)}")
    p.add_argument("--label", help="the model's name in costs and orders (default: --model)")
    p.add_argument("--scale", type=float, default=1.0, help="input resolution factor (0.25..1)")
    p.add_argument("--min-size", type=int, default=0,
                   help="shorter input side (default: 800 with --data or torchvision weights, as "
                        "torchvision; the built-in images' size without --data)")
    p.add_argument("--max-size", type=int, default=0, help="longest input side (default: 1333 with --data or "
                                                            "torchvision weights; --min-size without --data)")
    p.add_argument("--anchor-base", type=int, default=0,
                   help="finest anchor size (default: 32 with --data or torchvision weights; min size / 8 "
                        "without --data)")
    p.add_argument("--weights",
                   help="torchvision weights name (e.g. RetinaNet_ResNet50_FPN_Weights.COCO_V1) or file")
    p.add_argument("--weights-backbone",
                   help="ImageNet weights name (e.g. ResNet50_Weights.IMAGENET1K_V1) or file")
    p.add_argument("--epochs", type=int, default=10,
                   help="passes over the training split (0: load and evaluate)")
    p.add_argument("--out", required=True, help="output folder (model.pt)")
    p = sub.add_parser("eval", parents=[run, data_arg],
                       help="COCOeval summaries, detection files and latency")
    p.add_argument("--ckpt", required=True, help="checkpoint file")
    p.add_argument("--out", help="folder for detections_bbox.json (and _segm.json), COCO results format")
    p = sub.add_parser("cost", parents=[run, data_arg],
                       help="adaptation-cost matrix between checkpoints (§3.2)")
    p.add_argument("--ckpts", nargs="+", required=True, help="two or more checkpoints")
    p.add_argument("--images", type=int, default=64, help="training images used (half fit, half held out)")
    p.add_argument("--out", required=True, help="output JSON file")
    p = sub.add_parser("order", parents=[run, data_arg, training, lr, distilling],
                       help="teacher order by Backward Greedy Selection (Alg. 1), or with --all every order")
    p.add_argument("--cost", help="cost JSON written by `cost`")
    p.add_argument("--student", help="the student's name in the cost file")
    p.add_argument("--k", type=int, default=DISTILL["k"],
                   help="at most this many teachers (default: %(default)s)")
    p.add_argument("--all", action="store_true", help="distil through every order of --teachers (Table 2)")
    p.add_argument("--ckpt-student", help="with --all: the student checkpoint")
    p.add_argument("--teachers", nargs="+", help="with --all: 2-4 teacher checkpoints")
    p.add_argument("--out", default="runs/orders", help="with --all: output folder")
    inherit_adapter(p)
    p = sub.add_parser("distill", parents=[run, data_arg, training, lr, distilling],
                       help="progressive distillation of a student from teacher checkpoints")
    p.add_argument("--student", required=True, help="student checkpoint (the off-the-shelf student)")
    p.add_argument("--teachers", nargs="+", required=True, help="teacher checkpoints")
    p.add_argument("--k", type=int, default=DISTILL["k"],
                   help="at most this many teachers (default: %(default)s)")
    p.add_argument("--keep-order", action="store_true", help="use the teachers in the given order, no BGS")
    p.add_argument("--mechanism", nargs="+", default=["l2"], choices=mechanisms.NAMES,
                   help="the feature loss of every stage, or one per stage, e.g. cwd cwd pkd (§3.4)")
    p.add_argument("--published-weights", action="store_true", help="the mechanisms' published loss weights")
    inherit_adapter(p)
    p.add_argument("--out", required=True, help="output folder")
    p = sub.add_parser("reproduce", parents=[run, training],
                       help="the whole method and its baselines on the built-in benchmark")
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="size of the run")
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--all-orders", action="store_true",
                   help="also distil through every order of BGS's teachers")
    p.add_argument("--mechanism", nargs="+", default=["l2"], choices=list(mechanisms.NAMES) + ["all"],
                   help="also run direct and MTPD with these mechanisms in place of the L2 (Fig. 4)")
    p.add_argument("--published-weights", action="store_true", help="the mechanisms' published loss weights")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="run every row for each seed (the pool is trained once); "
                        "results.json and report.md give the mean and spread")
    p.add_argument("--lam", type=float, help="weight of the feature loss (default: the preset's)")
    p.add_argument("--stage-steps", type=int, help="iterations per stage; every row trains k times as many "
                   "(default: the preset's; the paper's protocol: the OTS student's, --stage-steps 800)")
    p.add_argument("--premise", nargs="+", metavar="TEACHER",
                   help="also distil the OTS student directly from these teachers of the pool (Fig. 1), or "
                        "'all' (default: the preset's: all for gap, none otherwise); BGS's first and last "
                        "teachers always, and rows already trained in the folder are reported too")
    inherit_adapter(p, method=False)
    return ap


def main(argv=None):
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in logs
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("train", "eval", "cost", "order", "distill", "reproduce", "-h", "--help"):
        argv = ["reproduce"] + argv  # bare flags are reproduce's: `python train.py --seed 1`
    args = get_args_parser().parse_args(argv)
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
            args.precision, why = engine.choose_precision(args.dev, args.precision)
            if args.cmd != "order" or args.all:  # every command that runs a model says in what precision
                print(f"precision {args.precision}: {why}")
        return {"train": cmd_train, "eval": cmd_eval, "cost": cmd_cost, "order": cmd_order,
                "distill": cmd_distill, "reproduce": cmd_reproduce}[args.cmd](args)
    except (engine.InputError, data.DataError) as e:  # bad input: one line, no traceback, exit code 2
        # (a DataLoader worker re-raises a DataError with its traceback in front: keep the message)
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix('data.DataError: ')}", file=sys.stderr)
        sys.exit(2)
    finally:
        if engine.distributed():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
