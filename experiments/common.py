"""What the experiments share: a finished run of `python train.py` (its results.json) and train.py's
arguments for it, so that an experiment trains with the rows' recipe, seeds and batches."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


def on_run(run, rest, fn):
    """fn(args, results, root, teachers) with train.py's arguments for the run in folder `run` (its preset,
    seed and method settings) and the flags `rest`; teachers: {label: checkpoint} of its pool."""
    path = os.path.join(run, "results.json")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} does not exist: run `python train.py --out {run}` first")
    res = json.load(open(path))
    st = res["settings"]
    argv = ["reproduce", "--preset", res["preset"], "--seed", res["seed"], "--out", run, "--lam", st["lam"],
            "--k", st["k"], "--inherit" if st["inherit"] else "--no-inherit",
            "--normalize" if st["normalize"] else "--no-normalize", "--precision", st["precision"], *rest]

    def command(args):
        p = train.PRESETS[args.preset]
        args.lr, args.stage_steps = p["lr"], p["stage_steps"]
        teachers = {t: os.path.join(res["pool"], f"{t}.pt") for t in res["teachers"]}
        return fn(args, res, train.data_root(args, args.preset), teachers)
    return train.main(argv, command)


def direct(args, res, root, teacher, label="direct", mechanism="l2"):
    """The run's `direct` row again, from its OTS student at its budget, seed and batches: from `teacher`
    (a checkpoint) with `mechanism`, into RUN/ckpt/<label>.pt (reused when there). -> its metrics."""
    ots = os.path.join(args.out, "ckpt", "ots.pt")
    model, spec, _ = train.engine.load(ots, args.dev)
    path, steps = os.path.join(args.out, "ckpt", f"{label}.pt"), args.stage_steps * len(res["order"])
    seed = args.seed + sum(map(ord, "direct"))  # the baselines' seed (train.reproduce)
    return train.fit(args, path, dict(spec, label=label), model, root, steps, seed, [teacher], args.inherit,
                     mechanism, init=ots)


def write(path, obj, markdown):
    """path.json and path.md, each written whole; the markdown printed too."""
    train.data.atomic_write(path + ".json", lambda f: json.dump(obj, f, indent=1))
    train.data.atomic_write(path + ".md", lambda f: f.write(markdown + "\n"))
    print(markdown)


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def pyplot():
    """matplotlib's pyplot (file backend), or None without matplotlib: then no figure, the tables stay."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None
