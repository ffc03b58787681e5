"""Every row of `python train.py` on several seeds with one teacher pool, and the mean ± std of each row and
of the paired gaps of Table 3: one seed is an anecdote, a difference needs the spread.

    python experiments/seeds.py --seeds 0 1 2 --out runs/seeds [any flag of python train.py]

Seed s runs into OUT/seed<s>, reusing what is there; the pool is trained once, in OUT/pool; OUT/seeds.json
and OUT/seeds.md hold the table.
"""
import argparse
import os
import statistics

from common import md_table, train, write

GAPS = [("direct", "long"), ("mtpd", "direct"), ("mtpd", "long_restart"), ("mtpd", "ensemble")]
COLS = ["AP", "APs", "APm", "APl"]


def mean_std(xs):
    return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def aggregate(per):
    """{seed: results.json} -> mean ± std (in AP points) of each row and of each paired gap."""
    runs = [r["runs"] for r in per.values()]
    rows = {name: {c: mean_std([100 * r[name][c] for r in runs]) for c in COLS} for name in runs[0]}
    gaps = {f"{a} − {b}": {c: mean_std([100 * (r[a][c] - r[b][c]) for r in runs]) for c in COLS}
            for a, b in GAPS}
    return dict(seeds=list(per), orders={s: r["order"] for s, r in per.items()}, rows=rows, gaps=gaps,
                per_seed={s: {n: round(100 * m["AP"], 1) for n, m in r["runs"].items()}
                          for s, r in per.items()},
                wall_minutes={s: r["wall_minutes"] for s, r in per.items()})


def markdown(agg):
    pm = lambda m, s, sign="": f"{m:{sign}.1f} ± {s:.1f}"  # noqa: E731
    body = [[n] + [pm(*v[c]) for c in COLS] for n, v in agg["rows"].items()]
    body += [[f"**{n}**"] + [pm(*v[c], "+") for c in COLS] for n, v in agg["gaps"].items()]
    orders = "; ".join(f"seed {s}: {' → '.join(o)}" for s, o in agg["orders"].items())
    head = f"Seeds {', '.join(map(str, agg['seeds']))}, mean ± std (gaps paired per seed). BGS: {orders}."
    return f"{head}\n\n" + md_table(["run"] + COLS, body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/seeds")
    own, rest = ap.parse_known_args(argv)
    per = {s: train.main([*rest, "--seed", s, "--out", os.path.join(own.out, f"seed{s}"),
                          "--pool", os.path.join(own.out, "pool")]) for s in own.seeds}
    agg = aggregate(per)
    write(os.path.join(own.out, "seeds"), agg, markdown(agg))
    return agg


if __name__ == "__main__":
    main()
