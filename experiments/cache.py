"""What the teacher-feature cache saves: the run's `direct` row trained again, from the same weights through
the same batches, with the teacher's features cached (from an empty cache, its filling included) and with
the teacher run at every step (engine.teacher_features without a cache); minutes of each, and the APs.

    python experiments/cache.py runs/default

RUN/cache.json and .md. Nothing of the run is changed.
"""
import argparse
import os
import time

from common import md_table, on_run, train, write

engine = train.engine


def cache(args, res, root, teachers):
    ots, budget = os.path.join(args.out, "ckpt", "ots.pt"), args.stage_steps * len(res["order"])
    recipe = dict(train.RECIPE, lr=args.lr, lam=args.lam, normalize=args.normalize, precision=args.precision,
                  resume=False, ckpt_every=10 ** 9)
    loader, val = train.loaders_for(args, root, train.PRESETS[args.preset]["student"]["name"])
    rows = {}
    for cached in (True, False):
        engine._caches.clear()
        model, teacher = engine.load(ots, args.dev)[0], engine.load(teachers[res["order"][-1]], args.dev)[0]
        if not cached:
            del teacher.source  # a teacher that is not a file's is never cached
        t = time.perf_counter()
        engine.train(model, loader, budget, args.dev, args.seed + sum(map(ord, "direct")), recipe, [teacher],
                     desc="cached" if cached else "uncached", inherit_first=args.inherit)
        minutes = (time.perf_counter() - t) / 60
        rows["cached" if cached else "teacher at every step"] = {
            "minutes": minutes, "AP": engine.evaluate(model, val, args.dev, args.precision)["AP"]}
    table = md_table(["direct row", "minutes", "AP"], [[k, f"{r['minutes']:.2f}", f"{100 * r['AP']:.1f}"]
                                                       for k, r in rows.items()])
    write(os.path.join(args.out, "cache"), rows, f"{budget} iterations, {args.precision}.\n\n{table}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a folder of `python train.py` (results.json)")
    own, rest = ap.parse_known_args()
    on_run(own.run, rest, cache)
