"""The embedded reproduction, `python train.py` (= `train.py reproduce`), in the paper's order:

    1. the off-the-shelf (OTS) student and a teacher pool, trained from scratch       (§4 setting)
    2. the adaptation-cost matrix and Backward Greedy Selection                        (§3.2, Alg. 1)
    3. MTPD and its baselines at the same budget: longer training, direct, ensemble     (Table 3)
    4. optionally, CWD / FGD / MGD / PKD in place of the L2, direct vs MTPD              (§3.4, Fig. 4)
    5. generalization and flatness of the longer-trained and the MTPD student          (§3.5, Fig. 5)
    6. optionally, every order of BGS's teachers                                        (Table 2)
    7. results.json and report.md

Configuration (the presets, the flags) lives in train.py and arrives here as arguments.
"""
import json
import os
import time

import analysis
import data
import engine
import mechanisms
import report
from engine import build, load, make_spec, save, save_ckpt, save_json, teacher_order


def reproduce(p, preset, out, root, make_loaders, device, seed, opts, mechanism=("l2",), all_orders=False,
              published=False):
    """The embedded reproduction, top to bottom (what `python train.py` runs).

    p: a preset of train.PRESETS; out: the run folder; root: the COCO-format data; make_loaders(batch,
    masks) -> (train, val) loaders; opts: engine.train_loop's fast-path and resume options; mechanism:
    mechanisms (or 'all') also compared direct vs MTPD; all_orders: also distil every order of BGS's
    teachers. Every model is cached in out/ckpt, so a second call reuses what is done. Returns results.
    """
    t0 = time.time()
    log = engine.jsonl(os.path.join(out, "log.jsonl"))
    train_loader, val_loader = make_loaders(p["batch"], False)
    cats = train_loader.dataset.category_ids

    def ckpt(label):
        return os.path.join(out, "ckpt", f"{label}.pt")

    def mask_loader():  # a two-stage teacher trains on instance masks too
        return make_loaders(p["batch"], True)[0]

    def ready(label, model_args, steps, init=None, teachers=(), fixed_seed=None, snapshots=None, mechanism="l2"):
        """Train (or reuse) one model and evaluate it; both are cached in the run folder.
        model_args = (label, name, scale, build kwargs); init: start from that checkpoint's weights;
        snapshots: {iteration: file} of intermediate weights to keep."""
        if os.path.isfile(ckpt(label)):  # reuse: only its metrics are needed here
            return engine.read(ckpt(label))["metrics"]
        _, name, scale, kw = model_args
        spec = make_spec(label, name, scale, p["size"], cats, **kw)
        run_seed = seed + sum(map(ord, label)) if fixed_seed is None else fixed_seed  # one per model
        model = build(spec, run_seed) if init is None else load(init, device)[0]
        state = os.path.join(out, "ckpt", f"{label}.state.pt")  # resume point, until the stage is done
        loader = mask_loader() if name.startswith("maskrcnn") else train_loader
        det = engine.train_loop(model, loader, steps, p["lr"], device, run_seed,
                                [load(t, device)[0] for t in teachers], p["lam"], desc=label, log=log,
                                state=state, snapshots=snapshots, mechanism=mechanism,
                                published=published, **opts)
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
    if os.path.isfile(ckpt("long")) and not all(map(os.path.isfile, snaps.values())):
        print(f"note: {ckpt('long')} predates its stage-boundary snapshots; delete it to retrain it with them "
              "(§3.5's long curve has only its end points until then)")
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
    results = {"preset": preset, "seed": seed, "cost": cost, "order": order,
               "teachers": pool, "stages": stages, "runs": runs, "budget_steps": budget}
    # 4. Fig. 4 (opt-in): another mechanism in place of the L2, direct vs MTPD, with the L2 rows' seeds
    mechs = {"l2": {"direct": runs["direct"], "mtpd": runs["mtpd"]}}
    pub = "_published" if published else ""  # the two weightings are cached under different labels
    for m in [m for m in mechanisms.NAMES if m != "l2" and (m in mechanism or "all" in mechanism)]:
        direct = ready(f"direct_{m}{pub}", s, budget, init=ckpt("ots"), teachers=[ckpt(order[-1])],
                       fixed_seed=seed + sum(map(ord, "direct")), mechanism=m)
        at = ckpt("ots")
        for i, t in enumerate(order):
            last = ready(f"mtpd_{m}{pub}_stage{i + 1}", s, S, init=at, teachers=[ckpt(t)],
                         fixed_seed=seed + sum(map(ord, f"mtpd_stage{i + 1}")), mechanism=m)
            at = ckpt(f"mtpd_{m}{pub}_stage{i + 1}")
        mechs[m] = {"direct": direct, "mtpd": last}
    if len(mechs) > 1:
        results["mechanisms"], results["published_weights"] = mechs, published
    # 5. §3.5 for the longer-trained and the MTPD student: loss vs AP at each stage boundary, flatness
    def student_at(path):  # a checkpoint, or a snapshot of the long run (a bare state_dict)
        ck = engine.read(path)
        model = build(spec)
        model.load_state_dict(ck.get("model", ck))  # read once: a checkpoint holds its weights under "model"
        return model

    start = [(0, ckpt("ots"), ots)]
    paths = {"long": start + [(k, f, None) for k, f in snaps.items() if os.path.isfile(f)]
             + [(budget, ckpt("long"), runs["long"])],
             "mtpd": start + [((i + 1) * S, ckpt(f"mtpd_stage{i + 1}"), st) for i, st in enumerate(stages)]}
    batches = analysis.fixed_batches(data.CocoDetection(root, "train", masks=False), *p["probe"])
    results["analysis"] = analysis.generalization_and_flatness(
        paths, {"long": ckpt("long"), "mtpd": prev}, student_at,
        lambda m: engine.evaluate(m, val_loader, device), batches, device=device, **p["landscape"])
    # 6. Table 2 (opt-in: n! orders)
    if all_orders:
        results["all_orders"] = every_order(ckpt("ots"), {t: ckpt(t) for t in order}, order, S, p["lr"],
                                            p["lam"], os.path.join(out, "orders"), train_loader, val_loader, log,
                                            device, seed, opts)
    results["wall_minutes"] = round((time.time() - t0) / 60, 2)
    save_json(os.path.join(out, "results.json"), results)
    log({"event": "done", "wall_minutes": results["wall_minutes"]})
    print(report.summary(results))
    if engine.is_main():
        print(f"report: {report.write_report(out, results)}")
    print(f"\nwall time {results['wall_minutes']:.1f} min; everything is in {out}/")
    return results


def every_order(student, teachers, bgs, steps, lr, lam, out, train_loader, val_loader, log, device, seed, opts):
    """Table 2: distil `student` (a checkpoint) through every order of `teachers` ({label: checkpoint}),
    `steps` iterations per stage. A prefix's student is cached in out/<t1+t2...>.pt, so orders sharing a
    prefix share its stages and an interrupted run continues. Every order uses the same seed per stage
    index, so orders differ only by their teachers. Returns {teachers, stage_steps, rows, bgs, bgs_rank}."""
    check_setup(out, student, teachers, steps, lr, lam, seed)

    def run_prefix(prefix):
        path = os.path.join(out, "+".join(prefix) + ".pt")
        if os.path.isfile(path):
            return engine.read(path)["metrics"]
        model, spec, _ = load(os.path.join(out, "+".join(prefix[:-1]) + ".pt") if len(prefix) > 1 else student)
        desc = " -> ".join(prefix)
        det = engine.train_loop(model, train_loader, steps, lr, device, seed + len(prefix),
                                [load(teachers[prefix[-1]], device)[0]], lam, desc=desc, log=log,
                                state=path[:-3] + ".state.pt", **opts)
        metrics = {**engine.evaluate(model, val_loader, device), "train_det_loss": det}
        save_ckpt(path, model, spec, metrics)
        engine.discard(path[:-3] + ".state.pt")
        print(f"{desc:40s} AP {100 * metrics['AP']:5.1f}")
        return metrics

    rows = analysis.all_orders(list(teachers), run_prefix)
    return {"teachers": list(teachers), "stage_steps": steps, "rows": rows, "bgs": list(bgs),
            "bgs_rank": analysis.rank_of(rows, bgs)}


def check_setup(out, student, teachers, steps, lr, lam, seed):
    """every_order's cache is keyed by teachers only: out/setup.json records the rest, and a folder that
    holds the orders of another setup is refused rather than silently reused."""
    setup = {"student": os.path.abspath(student), "steps": steps, "lr": lr, "lam": lam, "seed": seed,
             "teachers": {k: os.path.abspath(v) for k, v in teachers.items()}}
    path = os.path.join(out, "setup.json")
    if os.path.isfile(path) and json.load(open(path)) != setup:
        engine.fail(f"{out} holds the orders of another setup (student, teachers, steps, lr, lam or seed differ); "
                    "choose another --out")
    save_json(path, setup)
