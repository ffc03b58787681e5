"""Fig. 4: MTPD wraps other feature-distillation mechanisms. For each of CWD, FGD, MGD and PKD in place of
the L2, the run's `direct` row and its MTPD row again, at the same budget, seeds and batches.

    python experiments/fig4.py runs/default [--mechanisms cwd fgd mgd pkd]

RUN/ckpt/<mechanism>_direct.pt and <mechanism>_mtpd_stage<i>.pt; RUN/fig4.json and .md hold the table.
"""
import argparse
import os

from common import direct, md_table, on_run, train, write


def fig4(args, res, root, teachers, mechs):
    ckpts, order = os.path.join(args.out, "ckpt"), res["order"]
    rows = {"l2": {"direct": res["runs"]["direct"]["AP"], "mtpd": res["runs"]["mtpd"]["AP"]}}
    for m in mechs:
        d = direct(args, res, root, teachers[order[-1]], f"{m}_direct", m)
        stages = train.progressive(args, f"{m}_mtpd_", os.path.join(ckpts, "ots.pt"), order, teachers, ckpts,
                                   root, [m] * len(order))[1]
        rows[m] = {"direct": d["AP"], "mtpd": stages[-1]["AP"]}
    table = md_table(["mechanism", "direct", "MTPD", "MTPD − direct"],
                     [[m, f"{100 * r['direct']:.1f}", f"{100 * r['mtpd']:.1f}",
                       f"{100 * (r['mtpd'] - r['direct']):+.1f}"] for m, r in rows.items()])
    write(os.path.join(args.out, "fig4"), rows, f"Order {' → '.join(order)}, seed {args.seed}.\n\n{table}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a folder of `python train.py` (results.json)")
    ap.add_argument("--mechanisms", nargs="+", default=["cwd", "fgd", "mgd", "pkd"],
                    choices=["cwd", "fgd", "mgd", "pkd"])
    own, rest = ap.parse_known_args()
    on_run(own.run, rest, lambda *a: fig4(*a, own.mechanisms))
