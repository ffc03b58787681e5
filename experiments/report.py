"""report.md for a run of `python train.py`: the Table-3 comparison, the cost matrix with BGS's path (as a
figure with matplotlib), the AP after each stage, and the tables of the experiments run on it since.

    python experiments/report.py runs/default
"""
import argparse
import json
import os

from common import md_table, pyplot, train


def cost_figure(plt, path, cost, chain):
    names = list(cost)
    m = [[cost[a].get(b, 0.0) for b in names] for a in names]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 1.1 * len(names) + 1.5))
    im = ax.imshow(m, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", color="w" if m[i][j] < 0.4 else "k")
    for a, b in zip(chain[:-1], chain[1:]):  # the cells BGS compared along the chosen chain
        xy = (names.index(b) - 0.5, names.index(a) - 0.5)
        ax.add_patch(plt.Rectangle(xy, 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="target B", ylabel="source A", title="d(A -> B); red: the BGS chain")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(run):
    res = json.load(open(os.path.join(run, "results.json")))
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    runs = md_table(["run"] + cols, [[n] + [f"{100 * m[c]:.1f}" for c in cols]
                                     for n, m in res["runs"].items()])
    names, chain = list(res["cost"]), ["ots", *res["order"]]
    cost = md_table(["d(row → col)"] + names, [[a] + [f"{res['cost'][a].get(b, 0):.3f}" for b in names]
                                                for a in names])
    plt = pyplot()
    if plt:
        cost_figure(plt, os.path.join(run, "cost.png"), res["cost"], chain)
        cost += "\n\n![cost matrix](cost.png)"
    stages = md_table(["stage", "teacher", "AP"], [[i + 1, s["teacher"], f"{100 * s['AP']:.1f}"]
                                                   for i, s in enumerate(res["stages"])])
    parts = [f"# {res['preset']} preset, seed {res['seed']} ({res['wall_minutes']:.1f} min, "
             f"{res['settings']['precision']})", f"## Table 3\n\n{runs}",
             f"## Adaptation costs and BGS: {' → '.join(res['order'])}\n\n{cost}",
             f"## MTPD's stages\n\n{stages}"]
    for name, title in (("orders", "Table 2: every order"), ("fig4", "Fig. 4: other mechanisms"),
                        ("premise", "Fig. 1: the premise"), ("generalization", "§3.5: generalization")):
        if os.path.isfile(os.path.join(run, f"{name}.md")):
            parts.append(f"## {title}\n\n" + open(os.path.join(run, f"{name}.md")).read())
    train.data.atomic_write(os.path.join(run, "report.md"), lambda f: f.write("\n\n".join(parts) + "\n"))
    return os.path.join(run, "report.md")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a folder of `python train.py` (results.json)")
    print(report(ap.parse_args().run))
