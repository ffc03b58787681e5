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
            "--normalize" if st["normalize"] else "--no-normalize", *rest]

    def command(args):
        p = train.PRESETS[args.preset]
        args.lr, args.stage_steps = p["lr"], p["stage_steps"]
        teachers = {t: os.path.join(res["pool"], f"{t}.pt") for t in res["teachers"]}
        return fn(args, res, train.data_root(args, args.preset), teachers)
    return train.main(argv, command)


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
