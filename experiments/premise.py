"""Fig. 1, the paper's premise: does a student distilled directly from a stronger but farther teacher stop
gaining? The run's OTS student distilled from each teacher of its pool, at the rows' budget, seed and
batches, against the teacher's AP and d(ots -> teacher). Meant for `--preset gap`.

    python train.py --preset gap --out runs/gap && python experiments/premise.py runs/gap

RUN/ckpt/direct_<teacher>.pt; RUN/premise.json, .md and .png (with matplotlib).
"""
import argparse
import os

from common import direct, md_table, on_run, pyplot, write


def premise(args, res, root, teachers):
    rows = {}
    for t, path in teachers.items():  # the run's own `direct` row for its last teacher
        m = direct(args, res, root, path, "direct" if t == res["order"][-1] else f"direct_{t}")
        rows[t] = {"teacher_AP": res["teachers"][t], "cost": res["cost"]["ots"][t], "AP": m["AP"]}
    long = res["runs"]["long"]["AP"]
    table = md_table(["teacher", "teacher AP", "d(ots → teacher)", "distilled AP", "− long"],
                     [[t, f"{100 * r['teacher_AP']:.1f}", f"{r['cost']:.3f}", f"{100 * r['AP']:.1f}",
                       f"{100 * (r['AP'] - long):+.1f}"]
                      for t, r in sorted(rows.items(), key=lambda x: x[1]["teacher_AP"])])
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for t, r in rows.items():
            ax.scatter(100 * r["teacher_AP"], 100 * r["AP"])
            ax.annotate(t, (100 * r["teacher_AP"], 100 * r["AP"]), fontsize=8)
        ax.axhline(100 * long, ls="--", c="grey", label="long (no teacher)")
        ax.set(xlabel="teacher AP", ylabel="distilled student AP", title="Fig. 1: direct distillation")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "premise.png"), dpi=120)
    write(os.path.join(args.out, "premise"), rows, table)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a folder of `python train.py` (results.json)")
    own, rest = ap.parse_known_args()
    on_run(own.run, rest, premise)
