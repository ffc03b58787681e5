"""report.md for a reproduce run: the comparison table, the cost matrix with the BGS path (Fig. 3), the AP
after each stage, generalization (Fig. 5a/b), the loss landscape (Fig. 5c/d), and, when they were run,
all orders (Table 2) and the mechanisms (Fig. 4).

    python report.py runs/default        # (re)write runs/default/report.md from its results.json

matplotlib is optional and imported only here, only to draw: without it every figure is a text table and
the report says so.
"""
import json
import os
import sys

from data import atomic_write

COLS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def table(rows):
    """A console table of {run: metrics}, AP columns in percent (COCOeval's -1: no object of that size)."""
    w = max([12, *(len(name) + 1 for name in rows)])
    lines = [f"{'run':{w}s}" + "".join(f"{c:>7s}" for c in COLS)]
    lines += [f"{name:{w}s}" + "".join(f"{pct(m[c]):>7s}" for c in COLS) for name, m in rows.items()]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def pct(v):
    return "n/a" if v is None or v < 0 else f"{100 * v:.1f}"


def bgs_path(order, student):
    """The cost cells BGS used, as (row, column): student -> first teacher, then each teacher -> the next."""
    chain = [student] + list(order)
    return list(zip(chain[:-1], chain[1:]))


# ---------------------------------------------------------------------------------------------------------
# Figures: each returns the markdown that shows it (an image, or its numbers as a table).
# ---------------------------------------------------------------------------------------------------------
def fig_cost(plt, path, cost, order, student):
    names = list(cost)
    marked = set(bgs_path(order, student))
    if plt is None:
        rows = [[a] + [f"**{cost[a].get(b, 0):.3f}**" if (a, b) in marked else f"{cost[a].get(b, 0):.3f}"
                       for b in names] for a in names]
        return md_table(["d(row -> col)"] + names, rows) + "\n\nBold: the cells on the BGS path."
    m = [[cost[a].get(b, 0.0) for b in names] for a in names]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 1.1 * len(names) + 1.5))
    im = ax.imshow(m, cmap="viridis")
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", color="w" if m[i][j] < 0.4 else "k")
    for a, b in marked:  # the chain student -> t1 -> ... -> tk, drawn as boxes joined by arrows
        i, j = names.index(a), names.index(b)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
    cells = [(names.index(b), names.index(a)) for a, b in bgs_path(order, student)]
    for (x0, y0), (x1, y1) in zip(cells[:-1], cells[1:]):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="red", lw=1.5))
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target B")
    ax.set_ylabel("source A")
    ax.set_title("adaptation cost d(A -> B); red: BGS path")
    fig.colorbar(im)
    return save(plt, fig, path)


def fig_stages(plt, path, results):
    runs, stages = results["runs"], results["stages"]
    xs = ["ots"] + [f"{i + 1}: {s['teacher']}" for i, s in enumerate(stages)]
    ys = [runs["ots"]["AP"]] + [s["AP"] for s in stages]
    if plt is None:
        return md_table(["after", "AP"], [[x, pct(y)] for x, y in zip(xs, ys)])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(xs)), [100 * y for y in ys], "o-", label="MTPD student")
    for k, style in (("long", ":"), ("direct", "--"), ("ensemble", "-.")):
        if k in runs:
            ax.axhline(100 * runs[k]["AP"], ls=style, color="grey", label=f"{k} (full budget)")
    ax.set_xticks(range(len(xs)), xs, rotation=20, ha="right")
    ax.set_ylabel("box AP")
    ax.set_title("student AP after each stage")
    ax.legend(fontsize=8)
    return save(plt, fig, path)


def fig_generalization(plt, path, gen):
    rows = [[name, p["step"], pct(p["AP"]), f"{p['det_loss']:.3f}"] for name, pts in gen.items() for p in pts]
    if plt is None:
        return md_table(["student", "iterations", "val AP", "train det. loss"], rows)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in gen.items():
        a1.plot([p["step"] for p in pts], [p["det_loss"] for p in pts], "o-", label=name)
        a2.plot([p["step"] for p in pts], [100 * p["AP"] for p in pts], "o-", label=name)
    a1.set(xlabel="iterations after OTS", ylabel="detection loss (fixed train batches)",
           title="training loss")
    a2.set(xlabel="iterations after OTS", ylabel="box AP", title="validation AP")
    a1.legend()
    a2.legend()
    return save(plt, fig, path)


def fig_landscape(plt, path, lands):
    if plt is None:
        rows = []
        for name, land in lands.items():
            mean = [sum(c[i] for c in land["curves"]) / len(land["curves"])
                    for i in range(len(land["alphas"]))]
            rows += [[name, f"{a:+.2f}", f"{v:.3f}"] for a, v in zip(land["alphas"], mean)]
        return md_table(["student", "step along direction", "mean loss (1-D)"], rows)
    fig, axes = plt.subplots(1, 1 + len(lands), figsize=(5 * (1 + len(lands)), 4))
    for k, (name, land) in enumerate(lands.items()):
        for i, c in enumerate(land["curves"]):
            axes[0].plot(land["alphas"], c, color=f"C{k}", alpha=0.8, label=name if i == 0 else None)
        cs = axes[k + 1].contour(land["alphas_2d"], land["alphas_2d"], land["grid"], levels=12)
        axes[k + 1].clabel(cs, fontsize=7)
        axes[k + 1].set_title(f"{name}: 2-D")
    axes[0].set(xlabel="step along a filter-normalised direction", ylabel="detection loss", title="1-D")
    axes[0].legend()
    return save(plt, fig, path)


def fig_premise(plt, path, premise, long_ap):
    """Fig. 1: the directly distilled student's AP against its teacher's AP and against d(ots -> teacher),
    one point per teacher of the pool; `long` (the same budget, no teacher) as a line. Over seeds, each
    point is the mean with the std as its error bar (`AP_std`)."""
    if plt is None:
        return "(the table above: matplotlib is not installed)"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, label in ((axes[0], "teacher_AP", "teacher AP"), (axes[1], "cost", "d(ots → teacher)")):
        for t, r in premise.items():
            xv = 100 * r[x] if x == "teacher_AP" else r[x]
            ax.errorbar(xv, 100 * r["AP"], yerr=100 * r.get("AP_std", 0.0), fmt="o", capsize=3,
                        color="C0" if r.get("kept", True) else "grey")
            ax.annotate(t, (xv, 100 * r["AP"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.axhline(100 * long_ap, ls=":", color="grey", label="long (no teacher)")
        ax.set(xlabel=label, ylabel="distilled student's AP")
        ax.legend(fontsize=8)
    axes[0].set_title("does the student track the teacher's strength?")
    axes[1].set_title("... or its distance?")
    return save(plt, fig, path)


def premise_rows(premise, long_ap):
    """[teacher, teacher AP, d(ots -> teacher), distilled AP, distilled - long], strongest teacher first."""
    return [[t + ("" if r.get("kept", True) else " (dropped)"), pct(r["teacher_AP"]), f"{r['cost']:.3f}",
             pct(r["AP"]), f"{100 * (r['AP'] - long_ap):+.1f}"]
            for t, r in sorted(premise.items(), key=lambda kv: -kv[1]["teacher_AP"])]


def other_length(orders):
    """A sentence when the forward-greedy order has another length than BGS's (another budget), else ''."""
    if len(orders["forward"]) == len(orders["bgs"]):
        return ""
    return (f" `mtpd_forward` trained {orders['budget_steps']['forward']} iterations: its order has another "
            "length than BGS's.")


def ratio_rows(results):
    """[run, start, end] of distill / detection loss for every distilled run of a reproduce result."""
    named = [(k, results["runs"][k]) for k in ("direct", "ensemble") if k in results["runs"]] + [
        (f"mtpd stage {i + 1} ({st['teacher']})", st) for i, st in enumerate(results["stages"])]
    return [[k, f"{m['distill_ratio_start']:.2f}", f"{m['distill_ratio_end']:.2f}"]
            for k, m in named if "distill_ratio_start" in m]


def save(plt, fig, path):
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return f"![{os.path.basename(path)}](figures/{os.path.basename(path)})"


def summary(results):
    """The console summary of a reproduce run: cost matrix, teachers, order, the table, flatness."""
    cost, runs = results["cost"], results["runs"]
    names = list(cost)
    w = max(map(len, names)) + 2
    lines = ["", "adaptation cost d(row -> column), fraction of the column's variance not explained:",
             " " * w + "".join(f"{n:>{w}s}" for n in names)]
    lines += [f"{a:{w}s}" + "".join(f"{cost[a].get(b, 0.0):{w}.3f}" for b in names) for a in names]
    lines += ["", "teachers: " + ", ".join(f"{k} AP {pct(v['AP'])}" for k, v in results["teachers"].items()),
              f"order: {' -> '.join(results['order'])}; budget {results['budget_steps']} steps after OTS "
              "for each row below", "", table(runs)]
    for k, v in results.get("mechanisms", {}).items():
        lines.append(f"{k:4s} direct {pct(v['direct']['AP']):>5s}   mtpd {pct(v['mtpd']['AP']):>5s}")
    an = results.get("analysis", {})
    for k, fl in an.get("flatness", {}).items():
        lines.append(f"{k}: detection loss {an['landscape'][k]['loss0']:.3f}, mean rise "
                     + ", ".join(f"{v:.3f} at r={r}" for r, v in fl.items()))
    if "premise" in results:
        lines += ["", "direct distillation from each teacher (Fig. 1): teacher AP, d(ots -> teacher), AP, "
                  "AP - long"] + ["  ".join(f"{c:>12s}" for c in r) for r in premise_rows(
                      results["premise"], runs["long"]["AP"])]
        lines.append(f"orders: BGS {' -> '.join(results['orders']['bgs'])}, forward greedy "
                     f"{' -> '.join(results['orders']['forward'])}")
    if "all_orders" in results:
        ao = results["all_orders"]
        lines.append(f"all orders: BGS's ranks {ao['bgs_rank']} of {len(ao['rows'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Several seeds: per-seed rows, mean and spread, and the gaps that Table 3 is about.
# ---------------------------------------------------------------------------------------------------------
GAPS = [("direct", "long"), ("mtpd", "direct"), ("mtpd", "long"), ("mtpd", "long_restart"),
        ("mtpd", "ensemble"), ("mtpd", "direct_bridge"), ("mtpd", "mtpd_forward")]


def mean_std(xs):
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def aggregate(preset, per):
    """{seed: one-seed results} -> the multi-seed results: per-seed orders and rows, the mean and std of
    every row and column, and of the gaps a - b (AP points x 0.01, like the rows)."""
    seeds = list(per)
    rows = [r for r in per[seeds[0]]["runs"] if all(r in per[s]["runs"] for s in seeds)]

    def col(r, c):  # COCOeval's -1 (no object of that size) stays -1: no mean of it
        xs = [per[s]["runs"][r][c] for s in seeds]
        return xs if min(xs) >= 0 else None

    stat = {r: {c: mean_std(col(r, c)) if col(r, c) else (-1.0, 0.0) for c in COLS} for r in rows}
    gaps = {f"{a} - {b}": {c: mean_std([x - y for x, y in zip(col(a, c), col(b, c))])
                           if col(a, c) and col(b, c) else (None, None) for c in COLS}
            for a, b in GAPS if a in stat and b in stat}
    budgets = {str(s): per[s]["budget_steps"] for s in seeds}
    notes = [] if len(set(budgets.values())) == 1 else [
        "BGS chose orders of different lengths, so the seeds' rows trained for different budgets "
        f"({budgets}): their mean mixes budgets"]
    if len({tuple(per[s]["order"]) for s in seeds}) > 1:
        notes.append("BGS chose different orders on different seeds, so `mtpd` and `direct_bridge` (where "
                     "run) average over different teachers; the per-seed orders are listed")
    missing = [r for r in per[seeds[0]]["runs"] if r not in rows]
    notes += [f"rows not run on every seed, left out of the mean: {', '.join(missing)}"] if missing else []
    per_seed = {str(s): {"order": per[s]["order"], "runs": per[s]["runs"],
                         "dropped": per[s].get("dropped", {})} for s in seeds}
    for s in seeds:  # the capacity-gap study's rows and orders, where it ran
        per_seed[str(s)].update({k: per[s][k] for k in ("premise", "orders") if k in per[s]})
    out = {"preset": preset, "seeds": seeds, "note": "; ".join(notes), "per_seed": per_seed,
           "teachers": per[seeds[0]]["teachers"], "recipe": per[seeds[0]].get("recipe", {}),
           "budget_steps": budgets,
           "mean": {r: {c: v[0] for c, v in cs.items()} for r, cs in stat.items()},
           "std": {r: {c: v[1] for c, v in cs.items()} for r, cs in stat.items()},
           "gaps": {g: {c: {"mean": v[0], "std": v[1]} for c, v in cs.items()} for g, cs in gaps.items()}}
    if all("premise" in per[s] for s in seeds):  # Fig. 1 over seeds: one shared pool, each seed's student
        teachers = [t for t in per[seeds[0]]["premise"] if all(t in per[s]["premise"] for s in seeds)]
        if len(teachers) < len(per[seeds[0]]["premise"]):
            out["note"] = "; ".join(filter(None, [out["note"], "teachers distilled directly on some seeds "
                                                   "only are left out of the premise's mean"]))

        def over(t, f):
            return mean_std([f(per[s]["premise"][t], per[s]["runs"]) for s in seeds])

        out["premise"] = {t: {"teacher_AP": r["teacher_AP"], "AP": over(t, lambda x, _: x["AP"]),
                              "cost": over(t, lambda x, _: x["cost"]),
                              "minus_long": over(t, lambda x, runs: x["AP"] - runs["long"]["AP"]),
                              "kept_on_seeds": sum(per[s]["premise"][t]["kept"] for s in seeds)}
                          for t, r in per[seeds[0]]["premise"].items() if t in teachers}
    return out


def pm(mean, std, sign=""):
    return "n/a" if mean is None or (mean < 0 and not sign) else f"{100 * mean:{sign}.1f} ± {100 * std:.1f}"


def seeds_summary(results):
    """The console summary of a multi-seed run: mean ± std of every row and of the gaps."""
    w = 16
    lines = ["", f"mean ± std over seeds {results['seeds']}:",
             f"{'run':{w}s}" + "".join(f"{c:>14s}" for c in COLS)]
    lines += [f"{r:{w}s}" + "".join(f"{pm(results['mean'][r][c], results['std'][r][c]):>14s}" for c in COLS)
              for r in results["mean"]]
    lines += ["", "gaps, AP points:"] + [
        f"{g:{w + 6}s}" + "".join(f"{pm(v[c]['mean'], v[c]['std'], '+'):>14s}" for c in COLS)
        for g, v in results["gaps"].items()]
    lines += ["", "orders: " + "; ".join(f"seed {s}: {' -> '.join(r['order'])}"
                                         for s, r in results["per_seed"].items())]
    lines += [f"note: {results['note']}"] if results.get("note") else []
    return "\n".join(lines)


def write_seeds_report(out, results, plt="auto"):
    """out/report.md for several seeds: mean ± std, the gaps, per-seed rows, Fig. 1 over seeds where it
    ran; each seed's own report in out/seed<s>/report.md. Returns the report's path."""
    seeds = results["seeds"]

    def ap(seed, row):
        return results["per_seed"][str(seed)]["runs"][row]["AP"]

    parts = [f"# mtpd report: preset `{results['preset']}`, seeds {', '.join(map(str, seeds))}",
             f"This invocation took {results.get('wall_minutes', 0):.1f} min. Each seed's own report, "
             "with its cost matrix, stages and analyses, is in `seed<s>/report.md`. The teacher pool is "
             "shared.",
             "## Mean ± std over seeds",
             md_table(["run"] + COLS, [[r] + [pm(results["mean"][r][c], results["std"][r][c]) for c in COLS]
                                       for r in results["mean"]]),
             "## Gaps (AP points, mean ± std over seeds)",
             md_table(["gap"] + COLS, [[g] + [pm(v[c]["mean"], v[c]["std"], "+") for c in COLS]
                                       for g, v in results["gaps"].items()]),
             "## Per seed (AP)",
             md_table(["run"] + [f"seed {s}" for s in seeds],
                      [[r] + [pct(results["per_seed"][str(s)]["runs"][r]["AP"]) for s in seeds]
                       for r in results["mean"]]),
             "## Per seed (AP points): the gaps",
             md_table(["gap"] + [f"seed {s}" for s in seeds],
                      [[f"{a} − {b}"] + [f"{100 * (ap(s, a) - ap(s, b)):+.1f}" for s in seeds]
                       for a, b in GAPS if a in results["mean"] and b in results["mean"]]),
             "Orders: " + "; ".join(f"seed {s}: {' → '.join(r['order'])}"
                                    for s, r in results["per_seed"].items()) + "."]
    if "premise" in results:
        pr = results["premise"]
        os.makedirs(os.path.join(out, "figures"), exist_ok=True)
        means = {t: {"teacher_AP": r["teacher_AP"], "cost": r["cost"][0], "AP": r["AP"][0],
                     "AP_std": r["AP"][1]} for t, r in pr.items()}
        parts += ["## Direct distillation from each teacher (Fig. 1), mean ± std over seeds",
                  md_table(["teacher", "teacher AP", "d(ots → teacher)", "distilled AP", "− long"]
                           + [f"seed {s}" for s in seeds],
                           [[t + ("" if r["kept_on_seeds"] == len(seeds) else
                                  f" (kept on {r['kept_on_seeds']} of {len(seeds)} seeds)"),
                             pct(r["teacher_AP"]), f"{r['cost'][0]:.3f} ± {r['cost'][1]:.3f}",
                             pm(*r["AP"]), pm(*r["minus_long"], "+")]
                            + [pct(results["per_seed"][str(s)]["premise"][t]["AP"]) for s in seeds]
                            for t, r in sorted(pr.items(), key=lambda kv: -kv[1]["teacher_AP"])]),
                  fig_premise(pyplot() if plt == "auto" else plt, os.path.join(out, "figures", "premise.png"),
                              means, results["mean"]["long"]["AP"]),
                  "Forward-greedy orders: " + "; ".join(
                      f"seed {s}: {' → '.join(r['orders']['forward'])}"
                      for s, r in results["per_seed"].items()) + "."]
    parts += [f"**Note:** {results['note']}."] if results.get("note") else []
    path = os.path.join(out, "report.md")
    atomic_write(path, lambda f: f.write("\n\n".join(parts) + "\n"))
    return path


# ---------------------------------------------------------------------------------------------------------
# The page.
# ---------------------------------------------------------------------------------------------------------
def study_sections(plt, figs, results):
    """The report's sections for what a run added beyond the rows: Fig. 1 (the capacity gap), all orders
    (Table 2) and the mechanisms (Fig. 4). -> a list of markdown parts (empty when none ran)."""
    runs, order, parts = results["runs"], results["order"], []
    if "premise" in results:
        long_ap, orders = runs["long"]["AP"], results["orders"]
        parts += ["## Direct distillation from each teacher (Fig. 1: the capacity gap)",
                  "The OTS student distilled directly from each teacher of the pool, at the rows' budget "
                  "and with the `direct` row's seed and batches. The premise of MTPD holds where the "
                  "distilled student stops tracking its teacher's strength: a stronger but farther teacher "
                  "gives no better student.",
                  md_table(["teacher", "teacher AP", "d(ots → teacher)", "distilled AP", "− long"],
                           premise_rows(results["premise"], long_ap)),
                  fig_premise(plt, os.path.join(figs, "premise.png"), results["premise"], long_ap),
                  f"Orders: BGS **{' → '.join(orders['bgs'])}** (`mtpd`); forward greedy "
                  f"**{' → '.join(orders['forward'])}** (`mtpd_forward`); `direct_bridge` distils from "
                  f"{orders['bgs'][0]} alone." + other_length(orders)]
    if "all_orders" in results:
        ao = results["all_orders"]
        parts += ["## All orders (Table 2)",
                  f"Every order of {', '.join(ao['teachers'])}, {ao['stage_steps']} iterations per stage. "
                  f"BGS's order ranks **{ao['bgs_rank'] or 'n/a'}** of {len(ao['rows'])}.",
                  md_table(["rank", "order", "AP after each stage", "final AP"],
                           [[i + 1, " → ".join(r["order"]) + (" **(BGS)**" if r["order"] == order else ""),
                             " / ".join(pct(a) for a in r["stage_AP"]), pct(r["AP"])]
                            for i, r in enumerate(ao["rows"])])]
    if "mechanisms" in results:
        mech = results["mechanisms"]
        parts += ["## Mechanisms: direct vs MTPD (Fig. 4)",
                  "Each mechanism replaces the L2 feature loss in every stage; direct = the last teacher "
                  "only, same budget.",
                  md_table(["mechanism", "direct AP", "MTPD AP", "MTPD − direct"],
                           [[k, pct(v["direct"]["AP"]), pct(v["mtpd"]["AP"]),
                             f"{100 * (v['mtpd']['AP'] - v['direct']['AP']):+.1f}"]
                            for k, v in mech.items()])]
    return parts


def write_report(out, results, plt="auto"):
    """Write out/report.md (and out/figures/*.png when matplotlib is there). Returns the report's path."""
    plt = pyplot() if plt == "auto" else plt
    figs = os.path.join(out, "figures")
    os.makedirs(figs, exist_ok=True)
    runs, order, an = results["runs"], results["order"], results.get("analysis", {})
    parts = [f"# mtpd report: preset `{results['preset']}`, seed {results['seed']}",
             f"This invocation took {results.get('wall_minutes', 0):.1f} min (checkpoints already in the "
             "folder are reused, not retrained). Every row below trained for "
             f"{results['budget_steps']} iterations after the off-the-shelf (OTS) student."]
    if plt is None:
        parts.append("*matplotlib is not installed: every figure is given as its numbers in a table "
                     "(`pip install matplotlib`, then `python report.py " + out + "` draws them).*")
    parts += ["## Results",
              md_table(["run"] + COLS, [[k] + [pct(v.get(c)) for c in COLS] for k, v in runs.items()]),
              "Teachers: " + ", ".join(f"{k} AP {pct(v['AP'])}" for k, v in results["teachers"].items())
              + ".",
              "## Adaptation cost and the BGS order (Fig. 3)",
              f"BGS order: **{' → '.join(order)}**. d(A → B) is the fraction of B's held-out feature "
              "variance that no linear 1×1 map of A explains.",
              fig_cost(plt, os.path.join(figs, "cost.png"), results["cost"], order, "ots"),
              "## AP after each stage", fig_stages(plt, os.path.join(figs, "stages.png"), results),
              "## Distillation vs detection loss",
              "The feature loss (after λ) over the detection loss, at each run's first logged iteration and "
              "over its last 20%: how much of the gradient the teacher steers.",
              md_table(["run", "start", "end"], ratio_rows(results))]
    if results.get("dropped"):
        parts.insert(parts.index("## Adaptation cost and the BGS order (Fig. 3)"),
                     "Dropped from the pool (not clearly above the longer-trained student): " + ", ".join(
                         f"{k} AP {pct(v)}" for k, v in results["dropped"].items()) + ".")
    if "generalization" in an:
        parts += ["## Generalization (§3.5, Fig. 5a/b)",
                  "Detection loss on fixed training batches (BatchNorm frozen) and validation AP, for the "
                  "student trained longer without a teacher and the MTPD student, at each stage boundary.",
                  fig_generalization(plt, os.path.join(figs, "generalization.png"), an["generalization"])]
    if "landscape" in an:
        fl = an["flatness"]
        parts += ["## Loss landscape (§3.5, Fig. 5c/d)",
                  "Detection loss along filter-normalised random directions (Li et al. 2018) around each "
                  "student's weights, on the same fixed batches; the same random draws for both students.",
                  md_table(["student", "loss at weights"]
                           + [f"mean rise at r={r}" for r in next(iter(fl.values()))],
                           [[k, f"{an['landscape'][k]['loss0']:.3f}"] + [f"{v:.3f}" for v in fl[k].values()]
                            for k in fl]),
                  fig_landscape(plt, os.path.join(figs, "landscape.png"), an["landscape"])]
    parts += study_sections(plt, figs, results)
    path = os.path.join(out, "report.md")
    atomic_write(path, lambda f: f.write("\n\n".join(parts) + "\n"))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(os.path.join(sys.argv[1], "results.json")):
        sys.exit("usage: python report.py RUN_DIR   (a folder with the results.json of `train.py reproduce`)")
    res = json.load(open(os.path.join(sys.argv[1], "results.json")))
    print(write_seeds_report(sys.argv[1], res) if "per_seed" in res else write_report(sys.argv[1], res))
