"""Table 2: the run's OTS student distilled through every order of BGS's teachers (n! orders of n, with
the rows' stage length and seeds), ranked by final AP: is BGS's order near the best one?

    python experiments/orders.py runs/default

Orders sharing a prefix share its stages (RUN/orders/<t1+t2>.pt); RUN/orders.json and .md hold the table.
"""
import argparse
import itertools
import os

from common import md_table, on_run, train, write


def orders(args, res, root, teachers):
    out, ots, rows = os.path.join(args.out, "orders"), os.path.join(args.out, "ckpt", "ots.pt"), []
    for order in itertools.permutations(res["order"]):
        student, aps = ots, []
        for i, t in enumerate(order):  # MTPD's stage i, as train.progressive trains it
            path = os.path.join(out, "+".join(order[:i + 1]) + ".pt")
            model, spec, _ = train.engine.load(student, args.dev)
            aps.append(train.fit(args, path, dict(spec, label="+".join(order[:i + 1])), model, root,
                                 args.stage_steps, args.seed + sum(map(ord, f"mtpd_stage{i + 1}")),
                                 [teachers[t]], args.inherit and i == 0, init=student)["AP"])
            student = path
        rows.append({"order": list(order), "AP": aps[-1], "stage_AP": aps})
    rows.sort(key=lambda r: -r["AP"])
    rank = 1 + sum(r["AP"] > next(x["AP"] for x in rows if x["order"] == res["order"]) for r in rows)
    table = md_table(["order", "AP", "AP after each stage"],
                     [[" → ".join(r["order"]) + (" (BGS)" if r["order"] == res["order"] else ""),
                       f"{100 * r['AP']:.1f}", ", ".join(f"{100 * a:.1f}" for a in r["stage_AP"])]
                      for r in rows])
    write(os.path.join(args.out, "orders"), {"rows": rows, "bgs": res["order"], "bgs_rank": rank},
          f"BGS's order ranks {rank} of {len(rows)}.\n\n{table}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a folder of `python train.py` (results.json)")
    own, rest = ap.parse_known_args()
    on_run(own.run, rest, orders)
