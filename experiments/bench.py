"""What the machinery costs, as ratios of timings taken side by side in one process: interleaved medians
after warm-up (absolute times on a shared machine are noise). Writes OUT (JSON) and prints it.

    python experiments/bench.py [--device cuda] [--repeats 10] [--out bench.json]

precision_gain_train_<who> / _eval_<who>: a step in float32 over one in what --precision auto picks here
(the student: RetinaNet-R18 at 0.5x; a teacher: R18 at 1x), > 1 where auto gains; distill_vs_student_*: a
distillation step from an R50 teacher at 1x over the student's own step, the teacher run at every step or
its features cached (engine.teacher_features); cost_vs_forwards: the cost matrix of 4 models over the
forwards it needs.
"""
import argparse
import json
import statistics
import tempfile
import time

import torch

from common import train

engine, data, mtpd = train.engine, train.data, train.mtpd


def median_times(fns, device, repeats):
    """Median seconds of each fn, timed in turns after two warm-up calls each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn(), fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--size", type=int, default=128, help="image size (the default preset's)")
    ap.add_argument("--out", default="bench.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    auto, why = engine.choose_precision(device)
    cpu = f"cpu x{torch.get_num_threads()} ({torch.backends.cpu.get_cpu_capability()})"
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
           "auto": f"{auto}: {why}"}
    with tempfile.TemporaryDirectory() as root:
        data.make_shapes(root, 16, 8, args.size, progress=False)
        loader = engine.loaders(root, 8, 0, False, device)[0]
        images, targets = next(iter(loader))
        images = [im.to(device) for im in images]
        cats = loader.dataset.category_ids

        def model(name, scale, **kw):
            spec = engine.make_spec(name, name, scale, args.size, cats, **train.SMALL, **kw)
            return engine.build(spec, 0).to(device)

        def stage(precision, scale=0.5, teachers=()):  # one training step of an R18 at `scale`
            recipe = dict(train.RECIPE, precision=precision, lam=1.0, normalize=True)
            st = engine.setup(model("retinanet_r18", scale), loader, 100, device, 0, recipe, teachers)
            return lambda: engine.step(st, images, targets, recipe)

        def evaluation(precision, scale):
            m = model("retinanet_r18", scale).eval().to(memory_format=engine.memory_format(precision))
            return lambda: torch.no_grad()(train.models.autocast(device, precision)(m))(images)

        for who, scale in (("student", 0.5), ("teacher", 1.0)):
            t = median_times({p: stage(p, scale) for p in ("fp32", auto)}, device, args.repeats)
            out[f"precision_gain_train_{who}"] = t["fp32"] / t[auto]
            t = median_times({p: evaluation(p, scale) for p in ("fp32", auto)}, device, args.repeats)
            out[f"precision_gain_eval_{who}"] = t["fp32"] / t[auto]
        teacher, cached = (model("retinanet_r50", 1.0, zero_init_residual=True) for _ in range(2))
        cached.source = "bench"  # as a teacher loaded from a file: its features may be cached
        t = median_times({"student": stage(auto), "forward": stage(auto, 0.5, [teacher]),
                          "cached": stage(auto, 0.5, [cached])}, device, args.repeats)
        out["distill_vs_student_forward"] = t["forward"] / t["student"]
        out["distill_vs_student_cached"] = t["cached"] / t["student"]
        pool = {f"r18@{s}x": model("retinanet_r18", s).eval() for s in (0.5, 0.75, 1.0, 1.25)}
        ds = data.CocoDetection(root, "train", masks=False)
        batches = [[ds[i][0].to(device) for i in range(j, j + 8)] for j in (0, 8)]
        forwards = torch.no_grad()(lambda: [train.models.fpn_features(m, b)
                                            for m in pool.values() for b in batches])
        t = median_times({"cost": lambda: engine.cost_matrix(pool, ds, 16, device), "forwards": forwards},
                         device, max(3, args.repeats // 3))
        out["cost_vs_forwards"] = t["cost"] / t["forwards"]
    data.atomic_write(args.out, lambda f: json.dump(out, f, indent=1))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
