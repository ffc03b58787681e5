"""The embedded reproduction, `python train.py` (= `train.py reproduce`), in the paper's order:

    1. the off-the-shelf (OTS) student and a teacher pool, trained from scratch       (§4 setting)
    2. the adaptation-cost matrix and Backward Greedy Selection                        (§3.2, Alg. 1)
    3. MTPD and its baselines at the same budget: longer training (one schedule, and    (Table 3, §3.5)
       restarted at MTPD's stage boundaries), direct, ensemble
    4. optionally, CWD / FGD / MGD / PKD in place of the L2, direct vs MTPD              (§3.4, Fig. 4)
    5. generalization and flatness of the longer-trained and the MTPD student          (§3.5, Fig. 5)
    6. optionally, every order of BGS's teachers                                        (Table 2)
    7. results.json and report.md; with several seeds, their mean and spread

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


def reproduce(p, preset, out, root, make_loaders, device, seeds, recipe, mechanism=("l2",), all_orders=False):
    """The embedded reproduction for one or several seeds (what `python train.py` runs).

    p: a preset of train.PRESETS; out: the run folder; root: the COCO-format data; make_loaders(batch,
    masks, seed) -> (train, val) loaders; seeds: one run of every row per seed. The teacher pool is trained
    once, with the first seed, and shared (the paper's teachers are fixed too). One seed writes everything
    to out/; several write each seed's run to out/seed<s>/ and the mean and spread to out/results.json and
    out/report.md. recipe: train.RECIPE with the run's values (engine.train_loop). Returns the results.
    """
    if len(seeds) == 1:
        return one_seed(p, preset, out, out, root, make_loaders, device, seeds[0], seeds[0], recipe, mechanism,
                        all_orders)
    t0 = time.time()
    per = {s: one_seed(p, preset, os.path.join(out, f"seed{s}"), out, root, make_loaders, device, s, seeds[0],
                       recipe, mechanism, all_orders) for s in seeds}
    results = report.aggregate(preset, per)
    results["wall_minutes"] = round((time.time() - t0) / 60, 2)
    save_json(os.path.join(out, "results.json"), results)
    print(report.seeds_summary(results))
    if engine.is_main():
        print(f"report: {report.write_seeds_report(out, results)}")
    print(f"\nwall time {results['wall_minutes']:.1f} min for {len(seeds)} seeds; everything is in {out}/")
    return results


def one_seed(p, preset, out, pool_out, root, make_loaders, device, seed, pool_seed, recipe, mechanism=("l2",),
             all_orders=False):
    """The reproduction for one seed, top to bottom. out: this seed's folder; pool_out: the folder whose
    ckpt/ holds the teacher pool (trained with pool_seed when missing). Every model is cached, so a second
    call reuses what is done. Returns the results (also out/results.json and out/report.md)."""
    t0 = time.time()
    log = engine.jsonl(os.path.join(out, "log.jsonl"))
    train_loader, val_loader = make_loaders(p["batch"], False, seed)
    cats = train_loader.dataset.category_ids
    inherit, published = p.get("inherit", False), recipe["published"]

    def evaluate(model):  # in the run's precision, as training evaluates
        return engine.evaluate(model, val_loader, device, recipe["precision"])

    def ckpt(label, folder=out):
        return os.path.join(folder, "ckpt", f"{label}.pt")

    def ready(label, m, steps, init=None, teachers=(), fixed_seed=None, snapshots=None, mechanism="l2",
              folder=out, base_seed=seed, inherit_first=False):
        """Train (or reuse) one model and evaluate it; both are cached in folder/ckpt.
        m: a preset's model (train.model: label, name, scale, build kwargs); init: start from that
        checkpoint's weights; snapshots: {iteration: file} of intermediate weights to keep; inherit_first:
        copy the first teacher's neck and head into the student before training (models.inherit)."""
        run_seed = base_seed + sum(map(ord, label)) if fixed_seed is None else fixed_seed  # one per model
        made = {"steps": steps, "seed": run_seed, "init": init and os.path.basename(init), "lr": recipe["lr"],
                "teachers": [os.path.basename(t) for t in teachers], "mechanism": mechanism}
        if teachers:
            made.update(lam=recipe["lam"], inherit=inherit_first, adapter=recipe["adapter"])
        if recipe["precision"] != "fp32":  # another (equally valid) result; float32 ones keep their records
            made["precision"] = recipe["precision"]
        if os.path.isfile(ckpt(label, folder)):  # reuse: only its metrics are needed here
            metrics = engine.read(ckpt(label, folder))["metrics"]
            if metrics.get("recipe", made) != made:
                engine.fail(f"{ckpt(label, folder)} was trained with another recipe ({metrics['recipe']}, now "
                            f"{made}): choose another --out, or delete it to retrain it")
            return metrics
        spec = make_spec(label, m["name"], m["scale"], p["size"], cats, **m["build"])
        model = build(spec, run_seed) if init is None else load(init, device)[0]
        loader = make_loaders(p["batch"], True, seed)[0] if m["name"].startswith("maskrcnn") else train_loader
        metrics = engine.fit(model, spec, ckpt(label, folder), loader, val_loader, steps, device, run_seed, recipe,
                             [load(t, device)[0] for t in teachers], desc=label, log=log, snapshots=snapshots,
                             mechanism=mechanism, inherit_first=inherit_first and bool(teachers),
                             extra={"recipe": made})
        print(f"{label:16s} AP {100 * metrics['AP']:5.1f}   ({(time.time() - t0) / 60:.1f} min)")
        return metrics

    # 1. the off-the-shelf student and the teacher pool, trained from scratch (the pool once for all seeds)
    s, S, k = p["student"], p["stage_steps"], p["k"]
    ots = ready("ots", s, p["student_steps"])
    pool = {m["label"]: ready(m["label"], m, m["steps"], folder=pool_out, base_seed=pool_seed) for m in p["pool"]}
    # the student trained longer without a teacher (one schedule as long as k stages: the paper's 3x when a
    # stage is as long as the OTS schedule); it keeps its weights at each stage boundary for §3.5. Every
    # baseline sees the same batch order (one data seed).
    same = seed + sum(map(ord, "direct"))
    snaps = {i * S: os.path.join(out, "ckpt", f"long@{i * S}.pt") for i in range(1, k)}
    long_k = ready("long", s, k * S, init=ckpt("ots"), snapshots=snaps, fixed_seed=same)
    # a teacher must clearly beat the longer-trained student, or it has nothing to teach (Table 3's teachers
    # are 3-7 AP above their students)
    margin = p.get("margin")  # None: keep every teacher
    dropped = {lab: m["AP"] for lab, m in pool.items() if margin is not None and m["AP"] < long_k["AP"] + margin}
    if dropped:
        print(f"dropped from the pool: {', '.join(dropped)} (AP not {100 * margin:.0f} points above "
              f"the longer-trained student's {100 * long_k['AP']:.1f})")
    kept = {lab: m for lab, m in pool.items() if lab not in dropped}
    if not kept:
        engine.fail(f"no teacher of the pool beats the longer-trained student ({100 * long_k['AP']:.1f} AP) by "
                    f"{100 * margin:.0f} points: train the teachers longer or use a lower margin")
    # 2. adaptation costs and BGS
    cost_path = os.path.join(out, "cost.json")
    cost = json.load(open(cost_path))["cost"] if os.path.isfile(cost_path) else None
    if cost is None or set(cost) != {"ots", *kept}:
        models = {"ots": load(ckpt("ots"))[0], **{lab: load(ckpt(lab, pool_out))[0] for lab in kept}}
        cost = engine.cost_matrix(models, data.CocoDetection(root, "train", masks=False), p["cost_images"], device)
        save_json(cost_path, {"cost": cost, "ap": {"ots": ots["AP"], **{k: v["AP"] for k, v in kept.items()}}})
    order = teacher_order(cost, "ots", {k: v["AP"] for k, v in kept.items()}, k)
    save_json(os.path.join(out, "order.json"), {"student": "ots", "order": order})
    print(f"BGS order: {' -> '.join(order)}")
    # 3. MTPD and the baselines, all at a budget of len(order) stages
    budget = S * len(order)
    teacher = {lab: ckpt(lab, pool_out) for lab in kept}
    runs = {"ots": ots, "long": long_k if len(order) == k else
            ready(f"long_{len(order)}x", s, budget, init=ckpt("ots"), fixed_seed=same)}
    restart, at = [], ckpt("ots")  # §3.5's control: MTPD's schedule (fresh AdamW and LR per stage), no teacher
    for i in range(len(order)):
        restart.append(ready(f"long_restart_stage{i + 1}", s, S, init=at,
                             fixed_seed=seed + sum(map(ord, f"mtpd_stage{i + 1}"))))
        at = ckpt(f"long_restart_stage{i + 1}")
    runs["long_restart"] = restart[-1]
    runs["direct"] = ready("direct", s, budget, init=ckpt("ots"), teachers=[teacher[order[-1]]], fixed_seed=same,
                           inherit_first=inherit)
    runs["ensemble"] = ready("ensemble", s, budget, init=ckpt("ots"), teachers=[teacher[t] for t in order],
                             fixed_seed=same, inherit_first=inherit)
    prev, stages = ckpt("ots"), []
    for i, t in enumerate(order):  # the progressive schedule (§3.2), each stage from the last one's weights
        label = f"mtpd_stage{i + 1}"
        stages.append({"teacher": t, **ready(label, s, S, init=prev, teachers=[teacher[t]],
                                             inherit_first=inherit and i == 0)})
        prev = ckpt(label)
    runs["mtpd"] = {k: v for k, v in stages[-1].items() if k != "teacher"}
    model, spec, _ = load(prev)
    save(os.path.join(out, "student.pt"), model.state_dict())  # plain state_dict, no adapters
    save_json(os.path.join(out, "student_spec.json"), spec)
    results = {"preset": preset, "seed": seed, "cost": cost, "order": order, "teachers": pool,
               "dropped": dropped, "stages": stages, "runs": runs, "budget_steps": budget,
               "recipe": {"lam": recipe["lam"], "inherit": inherit, "adapter": recipe["adapter"], "k": k,
                          "stage_steps": S, "student_steps": p["student_steps"]}}
    # 4. Fig. 4 (opt-in): another mechanism in place of the L2, direct vs MTPD, with the L2 rows' seeds
    mechs = {"l2": {"direct": runs["direct"], "mtpd": runs["mtpd"]}}
    pub = "_published" if published else ""  # the two weightings are cached under different labels
    for m in [m for m in mechanisms.NAMES if m != "l2" and (m in mechanism or "all" in mechanism)]:
        direct = ready(f"direct_{m}{pub}", s, budget, init=ckpt("ots"), teachers=[teacher[order[-1]]],
                       fixed_seed=same, mechanism=m, inherit_first=inherit)
        at = ckpt("ots")
        for i, t in enumerate(order):
            last = ready(f"mtpd_{m}{pub}_stage{i + 1}", s, S, init=at, teachers=[teacher[t]],
                         fixed_seed=seed + sum(map(ord, f"mtpd_stage{i + 1}")), mechanism=m,
                         inherit_first=inherit and i == 0)
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

    long_path = ckpt("long") if len(order) == k else ckpt(f"long_{len(order)}x")
    start = [(0, ckpt("ots"), ots)]
    paths = {"long": start + [(i, f, None) for i, f in snaps.items() if i < budget and os.path.isfile(f)]
             + [(budget, long_path, runs["long"])],
             "mtpd": start + [((i + 1) * S, ckpt(f"mtpd_stage{i + 1}"), st) for i, st in enumerate(stages)]}
    batches = analysis.fixed_batches(data.CocoDetection(root, "train", masks=False), *p["probe"])
    results["analysis"] = analysis.generalization_and_flatness(
        paths, {"long": long_path, "mtpd": prev}, student_at,
        evaluate, batches, device=device, **p["landscape"])
    # 6. Table 2 (opt-in: n! orders)
    if all_orders:
        results["all_orders"] = every_order(ckpt("ots"), {t: teacher[t] for t in order}, order, S,
                                            os.path.join(out, "orders"), train_loader, val_loader, log, device,
                                            seed, recipe, inherit)
    results["wall_minutes"] = round((time.time() - t0) / 60, 2)
    save_json(os.path.join(out, "results.json"), results)
    log({"event": "done", "wall_minutes": results["wall_minutes"]})
    print(report.summary(results))
    if engine.is_main():
        print(f"report: {report.write_report(out, results)}")
    print(f"\nwall time {results['wall_minutes']:.1f} min; everything is in {out}/")
    return results


def every_order(student, teachers, bgs, steps, out, train_loader, val_loader, log, device, seed, recipe,
                inherit=False):
    """Table 2: distil `student` (a checkpoint) through every order of `teachers` ({label: checkpoint}),
    `steps` iterations per stage. A prefix's student is cached in out/<t1+t2...>.pt, so orders sharing a
    prefix share its stages and an interrupted run continues. Every order uses the same seed per stage
    index, so orders differ only by their teachers; inherit: the first stage inherits (models.inherit).
    Returns {teachers, stage_steps, rows, bgs, bgs_rank}."""
    check_setup(out, student, teachers, steps, recipe["lr"], recipe["lam"], seed, inherit,
                recipe["adapter"], recipe["precision"])

    def run_prefix(prefix):
        path = os.path.join(out, "+".join(prefix) + ".pt")
        if os.path.isfile(path):
            return engine.read(path)["metrics"]
        model, spec, _ = load(os.path.join(out, "+".join(prefix[:-1]) + ".pt") if len(prefix) > 1 else student)
        desc = " -> ".join(prefix)
        metrics = engine.fit(model, spec, path, train_loader, val_loader, steps, device, seed + len(prefix), recipe,
                             [load(teachers[prefix[-1]], device)[0]], desc=desc, log=log,
                             inherit_first=inherit and len(prefix) == 1)
        print(f"{desc:40s} AP {100 * metrics['AP']:5.1f}")
        return metrics

    rows = analysis.all_orders(list(teachers), run_prefix)
    return {"teachers": list(teachers), "stage_steps": steps, "rows": rows, "bgs": list(bgs),
            "bgs_rank": analysis.rank_of(rows, bgs)}


def check_setup(out, student, teachers, steps, lr, lam, seed, inherit=False, adapter="auto",
                precision="fp32"):
    """every_order's cache is keyed by teachers only: out/setup.json records the rest, and a folder that
    holds the orders of another setup is refused rather than silently reused."""
    setup = {"student": os.path.abspath(student), "steps": steps, "lr": lr, "lam": lam, "seed": seed,
             "teachers": {k: os.path.abspath(v) for k, v in teachers.items()}, "inherit": inherit, "adapter": adapter,
             "precision": precision}
    path = os.path.join(out, "setup.json")
    if os.path.isfile(path) and json.load(open(path)) != setup:
        engine.fail(f"{out} holds the orders of another setup (student, teachers, steps, lr, lam or seed differ); "
                    "choose another --out")
    save_json(path, setup)
