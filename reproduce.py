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
from types import SimpleNamespace

import analysis
import data
import engine
import mechanisms
import mtpd
import report
from engine import build, load, make_spec, save, save_json, teacher_order


def reproduce(p, preset, out, root, make_loaders, device, seeds, recipe, mechanism=("l2",), all_orders=False):
    """The embedded reproduction for one or several seeds (what `python train.py` runs).

    p: a preset of train.PRESETS; out: the run folder; root: the COCO-format data; make_loaders(batch,
    masks, seed) -> (train, val) loaders; seeds: one run of every row per seed. The teacher pool is trained
    once, with the first seed, and shared (the paper's teachers are fixed too). One seed writes everything
    to out/; several write each seed's run to out/seed<s>/ and the mean and spread to out/results.json and
    out/report.md. recipe: train.RECIPE with the run's values (engine.train_loop). Returns the results.
    """
    if len(seeds) == 1:
        return one_seed(p, preset, out, out, root, make_loaders, device, seeds[0], seeds[0], recipe,
                        mechanism, all_orders)
    t0 = time.time()
    per = {s: one_seed(p, preset, os.path.join(out, f"seed{s}"), out, root, make_loaders, device, s, seeds[0],
                       recipe, mechanism, all_orders) for s in seeds}
    return finish(out, report.aggregate(preset, per), t0, report.seeds_summary, report.write_seeds_report,
                  f" for {len(seeds)} seeds")


def one_seed(p, preset, out, pool_out, root, make_loaders, device, seed, pool_seed, recipe, mechanism=("l2",),
             all_orders=False):
    """The reproduction for one seed, top to bottom. out: this seed's folder; pool_out: the folder whose
    ckpt/ holds the teacher pool (trained with pool_seed when missing). Every model is cached, so a second
    call reuses what is done. Returns the results (also out/results.json and out/report.md)."""
    run = setup(p, out, pool_out, make_loaders, device, seed, pool_seed, recipe)
    s, S, k = p["student"], p["stage_steps"], p["k"]
    # 1. the off-the-shelf student and the teacher pool, trained from scratch (the pool once for all seeds)
    ots = ready(run, "ots", s, p["student_steps"])
    pool = {m["label"]: ready(run, m["label"], m, m["steps"], folder=pool_out, base_seed=pool_seed)
            for m in p["pool"]}
    # the student trained longer without a teacher (one schedule as long as k stages: the paper's 3x when a
    # stage is as long as the OTS schedule); it keeps its weights at each stage boundary for §3.5.
    snaps = {i * S: ckpt(run, f"long@{i * S}") for i in range(1, k)}
    long_k = ready(run, "long", s, k * S, init=ckpt(run, "ots"), snapshots=snaps, fixed_seed=run.same)
    kept, dropped = strong_teachers(pool, long_k, p.get("margin"))
    # 2. adaptation costs (of every model of the pool) and BGS (over the kept teachers)
    cost, order = costs_and_order(run, root, ots, pool, kept)
    # 3. MTPD and the baselines, all at a budget of len(order) stages
    teacher = {lab: ckpt(run, lab, pool_out) for lab in pool}
    runs, stages, last = baselines_and_mtpd(run, ots, long_k, order, teacher)
    model, spec, _ = load(last)
    save(os.path.join(out, "student.pt"), model.state_dict())  # plain state_dict, no adapters
    save_json(os.path.join(out, "student_spec.json"), spec)
    results = {"preset": preset, "seed": seed, "cost": cost, "order": order, "teachers": pool,
               "dropped": dropped, "stages": stages, "runs": runs, "budget_steps": S * len(order),
               "recipe": {"lam": recipe["lam"], "inherit": run.inherit, "adapter": recipe["adapter"], "k": k,
                          "stage_steps": S, "student_steps": p["student_steps"]}}
    # 4. Fig. 4 (opt-in): another mechanism in place of the L2, direct vs MTPD, with the L2 rows' seeds
    mechs = mechanism_rows(run, order, teacher, runs, mechanism)
    if len(mechs) > 1:
        results["mechanisms"], results["published_weights"] = mechs, recipe["published"]
    # 4b. the capacity-gap study (opt-in, preset key `premise`): direct distillation from every teacher of
    # the pool (Fig. 1: does the distilled student track the teacher's strength?), and the orders compared
    if p.get("premise"):
        results["premise"], results["orders"] = premise_and_orders(run, cost, order, pool, kept, teacher,
                                                                   runs)
    # 5. §3.5 for the longer-trained and the MTPD student: loss vs AP at each stage boundary, flatness
    results["analysis"] = generalization(run, root, spec, ots, runs, stages, snaps, last, len(order))
    # 6. Table 2 (opt-in: n! orders)
    if all_orders:
        results["all_orders"] = every_order(ckpt(run, "ots"), {t: teacher[t] for t in order}, order, S,
                                            os.path.join(out, "orders"), run.train_loader, run.val_loader,
                                            run.log, device, seed, recipe, run.inherit)
    # 7. results.json and report.md
    finish(out, results, run.t0, report.summary, report.write_report)
    run.log({"event": "done", "wall_minutes": results["wall_minutes"]})
    return results


def finish(out, results, t0, summary, write_report, what=""):
    """results.json with the wall time since t0, the summary printed, report.md (rank 0)."""
    results["wall_minutes"] = round((time.time() - t0) / 60, 2)
    save_json(os.path.join(out, "results.json"), results)
    print(summary(results))
    if engine.is_main():
        print(f"report: {write_report(out, results)}")
    print(f"\nwall time {results['wall_minutes']:.1f} min{what}; everything is in {out}/")
    return results


def setup(p, out, pool_out, make_loaders, device, seed, pool_seed, recipe):
    """What every step of one seed's run reads: the preset, folders, loaders, seeds, recipe, log, start."""
    t0 = time.time()
    train_loader, val_loader = make_loaders(p["batch"], False, seed)
    return SimpleNamespace(p=p, out=out, pool_out=pool_out, make_loaders=make_loaders, device=device,
                           seed=seed, pool_seed=pool_seed, recipe=recipe, inherit=p["inherit"],
                           train_loader=train_loader, val_loader=val_loader,
                           cats=train_loader.dataset.category_ids,
                           log=engine.jsonl(os.path.join(out, "log.jsonl")),
                           same=seed + sum(map(ord, "direct")),  # every baseline sees one batch order
                           t0=t0)


def ckpt(run, label, folder=None):
    return os.path.join(folder or run.out, "ckpt", f"{label}.pt")


def stage_seed(run, i):
    """Stage i's seed, shared by MTPD, its restarted control and the mechanisms' rows."""
    return run.seed + sum(map(ord, f"mtpd_stage{i + 1}"))


def ready(run, label, m, steps, init=None, teachers=(), fixed_seed=None, snapshots=None, mechanism="l2",
          folder=None, base_seed=None, inherit_first=False):
    """Train (or reuse) one model and evaluate it; both are cached in folder/ckpt (default: run.out).
    m: a preset's model (train.model: label, name, scale, build kwargs); init: start from that
    checkpoint's weights; snapshots: {iteration: file} of intermediate weights to keep; inherit_first:
    copy the first teacher's neck and head into the student before training (models.inherit). A model's
    seed is base_seed (default: the run's) plus its label's characters, unless fixed_seed is given."""
    recipe, path = run.recipe, ckpt(run, label, folder)
    base_seed = run.seed if base_seed is None else base_seed
    run_seed = base_seed + sum(map(ord, label)) if fixed_seed is None else fixed_seed
    made = {"steps": steps, "seed": run_seed, "init": init and os.path.basename(init), "lr": recipe["lr"],
            "teachers": [os.path.basename(t) for t in teachers], "mechanism": mechanism}
    if teachers:
        made.update(lam=recipe["lam"], inherit=inherit_first, adapter=recipe["adapter"])
    if recipe["precision"] != "fp32":  # another (equally valid) result; float32 ones keep their records
        made["precision"] = recipe["precision"]
    if os.path.isfile(path):  # reuse: only its metrics are needed here
        metrics = engine.read(path)["metrics"]
        if metrics.get("recipe", made) != made:
            engine.fail(f"{path} was trained with another recipe ({metrics['recipe']}, now {made}): choose "
                        "another --out, or delete it to retrain it")
        return metrics
    spec = make_spec(label, m["name"], m["scale"], run.p["size"], run.cats, **m["build"])
    model = build(spec, run_seed) if init is None else load(init, run.device)[0]
    loader = run.train_loader
    if m["name"].startswith("maskrcnn"):
        loader = run.make_loaders(run.p["batch"], True, run.seed)[0]
    metrics = engine.fit(model, spec, path, loader, run.val_loader, steps, run.device, run_seed, recipe,
                         [load(t, run.device)[0] for t in teachers], desc=label, log=run.log,
                         snapshots=snapshots, mechanism=mechanism,
                         inherit_first=inherit_first and bool(teachers), extra={"recipe": made})
    print(f"{label:16s} AP {100 * metrics['AP']:5.1f}   ({(time.time() - run.t0) / 60:.1f} min)")
    return metrics


def strong_teachers(pool, long_k, margin):
    """The teachers that clearly beat the longer-trained student (Table 3's teachers are 3-7 AP above their
    students), by `margin` AP (None: keep every teacher). -> (kept {label: metrics}, dropped {label: AP})."""
    dropped = {lab: m["AP"] for lab, m in pool.items()
               if margin is not None and m["AP"] < long_k["AP"] + margin}
    if dropped:
        print(f"dropped from the pool: {', '.join(dropped)} (AP not {100 * margin:.0f} points above "
              f"the longer-trained student's {100 * long_k['AP']:.1f})")
    kept = {lab: m for lab, m in pool.items() if lab not in dropped}
    if not kept:
        engine.fail(f"no teacher of the pool beats the longer-trained student "
                    f"({100 * long_k['AP']:.1f} AP) by {100 * margin:.0f} points: "
                    "train the teachers longer or use a lower margin")
    return kept, dropped


def costs_and_order(run, root, ots, pool, kept):
    """§3.2: the adaptation-cost matrix of the OTS student and every teacher of the pool (cached in
    cost.json while the models are the same), and the BGS order of the kept teachers (Alg. 1, at most k)."""
    cost_path = os.path.join(run.out, "cost.json")
    cost = json.load(open(cost_path))["cost"] if os.path.isfile(cost_path) else None
    if cost is None or set(cost) != {"ots", *pool}:
        models = {"ots": load(ckpt(run, "ots"))[0],
                  **{lab: load(ckpt(run, lab, run.pool_out))[0] for lab in pool}}
        cost = engine.cost_matrix(models, data.CocoDetection(root, "train", masks=False),
                                  run.p["cost_images"], run.device)
        save_json(cost_path, {"cost": cost,
                              "ap": {"ots": ots["AP"], **{k: v["AP"] for k, v in pool.items()}}})
    order = teacher_order(cost, "ots", {k: v["AP"] for k, v in kept.items()}, run.p["k"])
    save_json(os.path.join(run.out, "order.json"), {"student": "ots", "order": order})
    print(f"BGS order: {' -> '.join(order)}")
    return cost, order


def progressive(run, label, order, teacher=None, mechanism="l2"):
    """MTPD's stages (§3.2) from the OTS student through `order`, stage i cached as label_stage<i+1>, each
    from the last one's weights with the stage's seed (stage_seed); teacher None: the same schedule
    without a teacher (§3.5's restarted control). -> (the last checkpoint, [each stage's metrics])."""
    def stage(at, t, i):
        name = f"{label}_stage{i + 1}"
        metrics = ready(run, name, run.p["student"], run.p["stage_steps"], init=at,
                        teachers=[teacher[t]] if teacher else [], fixed_seed=stage_seed(run, i),
                        mechanism=mechanism, inherit_first=run.inherit and i == 0)
        return ckpt(run, name), metrics

    return mtpd.progressive_distillation(ckpt(run, "ots"), order, stage)


def baselines_and_mtpd(run, ots, long_k, order, teacher):
    """Table 3's rows at one budget (len(order) stages): the OTS student; training longer, in one schedule
    and restarted at MTPD's stage boundaries (fresh AdamW and LR per stage, no teacher: §3.5's control);
    direct (the last teacher only); the ensemble of the order's teachers; MTPD.
    -> (runs {row: metrics}, MTPD's stages [{teacher, metrics}], MTPD's last checkpoint)."""
    s, S, k = run.p["student"], run.p["stage_steps"], run.p["k"]
    budget, inherit, start = S * len(order), run.inherit, ckpt(run, "ots")
    runs = {"ots": ots, "long": long_k if len(order) == k else
            ready(run, f"long_{len(order)}x", s, budget, init=start, fixed_seed=run.same)}
    runs["long_restart"] = progressive(run, "long_restart", order)[1][-1]
    runs["direct"] = ready(run, "direct", s, budget, init=start, teachers=[teacher[order[-1]]],
                           fixed_seed=run.same, inherit_first=inherit)
    runs["ensemble"] = ready(run, "ensemble", s, budget, init=start, teachers=[teacher[t] for t in order],
                             fixed_seed=run.same, inherit_first=inherit)
    last, metrics = progressive(run, "mtpd", order, teacher)
    runs["mtpd"] = metrics[-1]
    return runs, [{"teacher": t, **m} for t, m in zip(order, metrics)], last


def premise_and_orders(run, cost, order, pool, kept, teacher, runs):
    """The capacity-gap study. Fig. 1 of the paper: the OTS student distilled directly from each teacher of
    the pool, kept or not (p['premise'] True; a list: those teachers, BGS's first and last, and the rows
    already trained in the folder), at the rows' budget with the `direct` row's seed and batches, against
    the teacher's AP and d(ots -> teacher): the premise holds where the distilled student stops tracking
    the teacher's strength. Adds two rows to `runs`: `direct_bridge` (direct from BGS's first teacher;
    `direct` when BGS chose one teacher) and `mtpd_forward` (MTPD through mtpd.forward_greedy_selection's
    order; `mtpd` when the two orders agree, `direct` when the forward order is the best teacher alone; one
    stage per teacher as MTPD, so a forward order of another length than BGS's trains for another
    budget, which the orders record). -> (premise {teacher: {teacher_AP, cost, kept, AP...}}, orders)."""
    S, asked = run.p["stage_steps"], run.p["premise"]
    direct = {}
    for t in pool:
        if t == order[-1]:
            direct[t] = runs["direct"]
        elif asked is True or t in (*asked, order[0]) or os.path.isfile(ckpt(run, f"direct_{t}")):
            direct[t] = ready(run, f"direct_{t}", run.p["student"], S * len(order), init=ckpt(run, "ots"),
                              teachers=[teacher[t]], fixed_seed=run.same, inherit_first=run.inherit)
    runs["direct_bridge"] = direct[order[0]]
    forward = mtpd.forward_greedy_selection(cost, "ots", {k: v["AP"] for k, v in kept.items()}, run.p["k"])
    print(f"forward-greedy order: {' -> '.join(forward)}")
    runs["mtpd_forward"] = (runs["mtpd"] if forward == order else runs["direct"] if len(forward) == 1 else
                            progressive(run, "mtpd_forward", forward, teacher)[1][-1])
    premise = {t: {"teacher_AP": pool[t]["AP"], "cost": cost["ots"][t], "kept": t in kept, **m}
               for t, m in direct.items()}
    budgets = {"bgs": S * len(order), "forward": S * len(forward)}
    return premise, {"bgs": order, "forward": forward, "budget_steps": budgets}


def mechanism_rows(run, order, teacher, runs, mechanism):
    """Fig. 4: direct and MTPD with each mechanism asked for in place of the L2, at the L2 rows' budget and
    seeds. -> {mechanism: {direct, mtpd}}, the L2's rows first."""
    mechs = {"l2": {"direct": runs["direct"], "mtpd": runs["mtpd"]}}
    pub = "_published" if run.recipe["published"] else ""  # the two weightings are cached apart
    budget = run.p["stage_steps"] * len(order)
    for m in [m for m in mechanisms.NAMES if m != "l2" and (m in mechanism or "all" in mechanism)]:
        direct = ready(run, f"direct_{m}{pub}", run.p["student"], budget, init=ckpt(run, "ots"),
                       teachers=[teacher[order[-1]]], fixed_seed=run.same, mechanism=m,
                       inherit_first=run.inherit)
        mechs[m] = {"direct": direct, "mtpd": progressive(run, f"mtpd_{m}{pub}", order, teacher, m)[1][-1]}
    return mechs


def generalization(run, root, spec, ots, runs, stages, snaps, last, n_stages):
    """§3.5 for the longer-trained and the MTPD student: train detection loss vs validation AP at each stage
    boundary, and the loss landscape around each final student (analysis.generalization_and_flatness)."""
    S, budget = run.p["stage_steps"], run.p["stage_steps"] * n_stages

    def student_at(path):  # a checkpoint, or a snapshot of the long run (a bare state_dict)
        ck = engine.read(path)
        model = build(spec)
        model.load_state_dict(ck.get("model", ck))  # read once: a checkpoint holds its weights under "model"
        return model

    long_path = ckpt(run, "long" if n_stages == run.p["k"] else f"long_{n_stages}x")
    start = [(0, ckpt(run, "ots"), ots)]
    paths = {"long": start + [(i, f, None) for i, f in snaps.items() if i < budget and os.path.isfile(f)]
             + [(budget, long_path, runs["long"])],
             "mtpd": start + [((i + 1) * S, ckpt(run, f"mtpd_stage{i + 1}"), st)
                              for i, st in enumerate(stages)]}
    batches = analysis.fixed_batches(data.CocoDetection(root, "train", masks=False), *run.p["probe"])
    return analysis.generalization_and_flatness(
        paths, {"long": long_path, "mtpd": last}, student_at,
        lambda model: engine.evaluate(model, run.val_loader, run.device, run.recipe["precision"]), batches,
        device=run.device, **run.p["landscape"])


def every_order(student, teachers, bgs, steps, out, train_loader, val_loader, log, device, seed, recipe,
                inherit=False):
    """Table 2: distil `student` (a checkpoint) through every order of `teachers` ({label: checkpoint}),
    `steps` iterations per stage. A prefix's student is cached in out/<t1+t2...>.pt, so orders sharing a
    prefix share its stages and an interrupted run continues. Every order uses the same seed per stage
    index, so orders differ only by their teachers; inherit: the first stage inherits (models.inherit).
    Returns {teachers, stage_steps, rows, bgs, bgs_rank}."""
    check_setup(out, student, teachers, steps, recipe["lr"], recipe["lam"], seed, inherit,
                recipe["adapter"], recipe["precision"])

    def run_order(order):
        def stage(at, t, i):
            path = os.path.join(out, "+".join(order[:i + 1]) + ".pt")
            if os.path.isfile(path):  # a prefix another order trained
                return path, engine.read(path)["metrics"]
            model, spec, _ = load(at)
            desc = " -> ".join(order[:i + 1])
            metrics = engine.fit(model, spec, path, train_loader, val_loader, steps, device, seed + i + 1,
                                 recipe, [load(teachers[t], device)[0]], desc=desc, log=log,
                                 inherit_first=inherit and i == 0)
            print(f"{desc:40s} AP {100 * metrics['AP']:5.1f}")
            return path, metrics

        return mtpd.progressive_distillation(student, order, stage)[1]

    rows = analysis.all_orders(list(teachers), run_order)
    return {"teachers": list(teachers), "stage_steps": steps, "rows": rows, "bgs": list(bgs),
            "bgs_rank": analysis.rank_of(rows, bgs)}


def check_setup(out, student, teachers, steps, lr, lam, seed, inherit=False, adapter="auto",
                precision="fp32"):
    """every_order's cache is keyed by teachers only: out/setup.json records the rest, and a folder that
    holds the orders of another setup is refused rather than silently reused."""
    setup = {"student": os.path.abspath(student), "steps": steps, "lr": lr, "lam": lam, "seed": seed,
             "teachers": {k: os.path.abspath(v) for k, v in teachers.items()}, "inherit": inherit,
             "adapter": adapter, "precision": precision}
    path = os.path.join(out, "setup.json")
    if os.path.isfile(path) and json.load(open(path)) != setup:
        engine.fail(f"{out} holds the orders of another setup "
                    "(student, teachers, steps, lr, lam, seed, inherit, adapter or precision differ); "
                    "choose another --out")
    save_json(path, setup)
