"""bench.py: what distillation and the method's own machinery cost, as ratios measured side by side.

    python bench.py --quick              # about 5 minutes on 2 CPU cores; writes bench.json
    python bench.py --device cuda        # on a GPU: also fp32 vs the low precision auto picks, images/s

Every figure is a ratio of two timings taken in the same process, interleaved, median of several repeats
after warm-up (absolute times on shared machines are noise). Peak memory is measured in two separate
processes. The SGD fit of the 1x1 maps (how the paper fits them) lives here as the reference, not in the
library.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import engine
import mtpd
from train import RECIPE, SMALL  # SMALL: the default preset's light RetinaNet
import models
from models import count_params, fpn_features


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def detector(name, scale, size, device, **kw):
    spec = engine.make_spec(name, name, scale, size, [1, 2, 3, 5, 8], **{**SMALL, **kw})
    return engine.build(spec).to(device)


def fake_batch(n, size, device, seed=0):
    """Random images with 1-4 random boxes each: timing does not depend on the content."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * size * 0.6
        wh = 8 + torch.rand(k, 2, generator=g) * size * 0.4
        images.append(torch.rand(3, size, size, generator=g).to(device))
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1).to(device),
                        "labels": torch.randint(1, 6, (k,), generator=g).to(device)})
    return images, targets


def stage(student, teachers, images, lam=1.0):
    """The pieces engine.train_loop builds for a stage: Distilled module, AdamW, schedule."""
    adapters = engine.stage_adapters(student, teachers, images)[0] if teachers else []
    m = engine.Distilled(student.train(), [mtpd.freeze(t) for t in teachers], adapters,
                         lam).to(images[0].device)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), params


# ---------------------------------------------------------------------------------------------------------
# P1: a distillation step vs a student step plus a teacher forward, on the same batch.
# ---------------------------------------------------------------------------------------------------------
def p1(device, size, batch, repeats, precision="fp32"):
    fmt = engine.memory_format(precision)
    images, targets = fake_batch(batch, size, device)
    student = detector("retinanet_r18", 0.5, size, device).to(memory_format=fmt)
    teacher = mtpd.freeze(detector("retinanet_r50", 1.0, size, device).to(memory_format=fmt))
    plain, dist = stage(student, [], images), stage(student, [teacher], images)

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def student_step():
        engine.train_step(*plain, images, targets, precision, RECIPE["clip"], scaler)

    def teacher_forward():
        with torch.no_grad(), models.autocast(device, precision):
            fpn_features(teacher, images)

    def distill_step():
        engine.train_step(*dist, images, targets, precision, RECIPE["clip"], scaler)

    fns = {"student": student_step, "teacher": teacher_forward, "distill": distill_step}
    for fn in fns.values():  # warm-up (allocator, cudnn autotuning)
        fn(), fn()
    t = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so that drifts of the machine hit all three alike
        for k, fn in fns.items():
            t[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in t.items()}
    plain[0].hook.remove(), dist[0].hook.remove()
    return {"p1_distill_step_ratio": med["distill"] / (med["student"] + med["teacher"]),
            "images_per_s_student": batch / med["student"], "images_per_s_distill": batch / med["distill"],
            "median_s": med}


# ---------------------------------------------------------------------------------------------------------
# P7: the plain float32 path vs what --precision auto runs on this machine, per step, and each switch alone.
# P8: the teacher's share of a distillation step, with its forward and with its features cached.
# ---------------------------------------------------------------------------------------------------------
def interleaved(fns, device, repeats):
    """Median seconds of each fn, timed in turns after two warm-up calls each."""
    for fn in fns.values():
        fn(), fn()
    t = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in t.items()}


# mode -> (precision, channels_last, fused AdamW): the plain path, each switch alone, and the low precision
P7_MODES = {"plain": ("fp32", False, False), "fused": ("fp32", False, True), "fp32_cl": ("fp32", True, True),
            "bf16": ("bf16", True, True)}


def p7(device, size, batch, repeats):
    """Training and evaluation for the student (R18 at 0.5x) and a teacher (R18 at 1x) in each of P7_MODES
    and in what --precision auto picks here ('auto': its precision, channels_last with bf16/fp16, fused
    AdamW). p7_train_<who> = plain / auto: what auto gains over plain float32 on this machine (>= 1.0
    wherever auto picks right); p7_bf16_vs_fp32_<who>: the bf16 step against the fused float32 one (> 1:
    bf16 is slower here)."""
    images, targets = fake_batch(batch, size, device)
    precision, why = engine.choose_precision(device, "auto")
    modes = {**P7_MODES, "auto": (precision, precision != "fp32", True)}
    if device.type == "cuda":
        modes["fp16"] = ("fp16", True, True)
    out = {"auto_precision": precision, "auto_reason": why}
    for who, (name, scale) in {"student": ("retinanet_r18", 0.5), "teacher": ("retinanet_r18", 1.0)}.items():
        fns, evals = {}, {}
        for mode, (prec, cl, fused) in modes.items():
            torch.manual_seed(0)
            fmt = torch.channels_last if cl else torch.contiguous_format
            m = detector(name, scale, size, device).to(memory_format=fmt)
            m_, _, _, params = stage(m, [], images)
            opt = engine.adamw(params, 1e-4, RECIPE["weight_decay"], fused=fused)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            scaler = torch.amp.GradScaler(device.type) if prec == "fp16" else None
            fns[mode] = lambda s=(m_, opt, sched, params), p=prec, sc=scaler: engine.train_step(
                *s, images, targets, p, RECIPE["clip"], sc)
            if mode != "fused":
                e = detector(name, scale, size, device).eval().to(memory_format=fmt)

                def run(e=e, p=prec):
                    with torch.no_grad(), models.autocast(device, p):
                        e(images)
                evals[mode] = run
        t, te = interleaved(fns, device, repeats), interleaved(evals, device, repeats)
        out[who] = {"train_s": t, "eval_s": te}
        out[f"p7_train_{who}"] = t["plain"] / t["auto"]
        out[f"p7_train_{who}_fused_only"] = t["plain"] / t["fused"]
        out[f"p7_train_{who}_fp32_channels_last"] = t["fused"] / t["fp32_cl"]
        out[f"p7_bf16_vs_fp32_{who}"] = t["bf16"] / t["fused"]
        out[f"p7_eval_{who}"] = te["plain"] / te["auto"]
    return out


def p8(device, size, batch, repeats):
    """A distillation step of the student from an R50 teacher in the precision auto picks: the teacher's
    share with its forward at every step and with its features cached; and what filling the cache costs."""
    precision, _ = engine.choose_precision(device, "auto")
    images, targets = fake_batch(batch, size, device)
    targets = [dict(t, image_id=i, flipped=False) for i, t in enumerate(targets)]
    fmt = engine.memory_format(precision)
    student = detector("retinanet_r18", 0.5, size, device).to(memory_format=fmt)
    teacher = mtpd.freeze(detector("retinanet_r50", 1.0, size, device).to(memory_format=fmt))
    adapters = engine.stage_adapters(student, [teacher], images)[0]

    def fill():
        with torch.no_grad(), models.autocast(device, precision):
            feats = fpn_features(teacher, images)
        keep = torch.float32 if precision == "fp32" else torch.float16  # as engine.teacher_cache keeps them
        return engine.FeatureCache({(i, False): {int(s): feats[int(s)][i].to(keep) for s in adapters[0]}
                                    for i in range(len(images))},
                                   {(i, False): feats.sizes[i] for i in range(len(images))})

    cache = fill()
    steps = {}
    for mode, caches in (("student", None), ("forward", None), ("cached", [cache])):
        teachers = [] if mode == "student" else [teacher]
        m = engine.Distilled(student.train(), teachers, adapters if teachers else [], 1.0, None,
                             precision, caches)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = engine.adamw(params, 1e-4, RECIPE["weight_decay"], fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        steps[mode] = (lambda s=(m, opt, sched, params), sc=scaler:
                       engine.train_step(*s, images, targets, precision, RECIPE["clip"], sc))
    t = interleaved({**steps, "fill": fill}, device, repeats)
    per_image = cache.nbytes() / len(images)
    return {"p8_teacher_share_cached": (t["cached"] - t["student"]) / t["cached"],
            "p8_teacher_share_forward": (t["forward"] - t["student"]) / t["forward"],
            "p8_cached_vs_forward_speedup": t["forward"] / t["cached"],
            "p8_fill_per_image_vs_step": t["fill"] / len(images) / (t["cached"] / len(images)),
            "p8_cache_mib_default_data": per_image * 2 * 800 / 2 ** 20, "p8_s": t}


# ---------------------------------------------------------------------------------------------------------
# P2: the cost matrix vs the forwards it needs; the exact solve vs the paper's SGD fit.
# ---------------------------------------------------------------------------------------------------------
POOL = [("retinanet_r18", 0.5), ("retinanet_r18", 0.75), ("retinanet_r18", 1.0), ("retinanet_r34", 1.0),
        ("retinanet_r50", 1.0), ("retinanet_r18", 0.625), ("retinanet_r34", 0.75), ("retinanet_r50", 0.75)]


def pool_models(n, size, device):
    return {f"{name}@{sc}": mtpd.freeze(detector(name, sc, size, device)) for name, sc in POOL[:n]}


def feature_batches(models, batches):
    """What engine.cost_matrix streams: (split, {model: {stride: [B, C, h, w]}}), half fit, half held."""
    with torch.no_grad():
        for i, images in enumerate(batches):
            yield ("fit" if i < len(batches) // 2 else "held"), {
                k: engine.float32(fpn_features(m, images)) for k, m in models.items()}


def forwards_only(models, batches):
    with torch.no_grad():
        for images in batches:
            for m in models.values():
                fpn_features(m, images)


def pair_rows(batches, a, b, s):
    """The rows the exact solve sees for pair a -> b at stride s: A resized to B's size, [P, Ca], [P, Cb]."""
    xs, ys = [], []
    for f in batches:
        xa = f[a][s]
        if xa.shape[-2:] != f[b][s].shape[-2:]:
            xa = torch.nn.functional.interpolate(xa, size=f[b][s].shape[-2:], mode="bilinear",
                                                 align_corners=False)
        xs.append(mtpd._rows(xa).float())
        ys.append(mtpd._rows(f[b][s]).float())
    return torch.cat(xs), torch.cat(ys)


def sgd_costs(feats, steps, lr=1e-2):
    """The paper's way, as the reference: each 1x1 map (a Ca -> Cb linear layer with bias, per ordered pair
    and level) trained by gradient descent (Adam, full batch, `steps` steps) on the fit features; the same
    held-out score as mtpd.costs_from_moments (SSE / SST pooled over levels)."""
    fit = [f for split, f in feats if split == "fit"]
    held = [f for split, f in feats if split == "held"]
    cost = {}
    for a in fit[0]:
        cost[a] = {}
        for b in fit[0]:
            if a == b:
                continue
            sse = sst = 0.0
            for s in mtpd.common_strides(fit[0][a], fit[0][b]):
                x, y = pair_rows(fit, a, b, s)
                lin = torch.nn.Linear(x.shape[1], y.shape[1]).to(x.device)
                opt = torch.optim.Adam(lin.parameters(), lr=lr)
                for _ in range(steps):
                    opt.zero_grad()
                    torch.nn.functional.mse_loss(lin(x), y).backward()
                    opt.step()
                hx, hy = pair_rows(held, a, b, s)
                with torch.no_grad():
                    sse += ((lin(hx) - hy) ** 2).sum().item()
                    sst += ((hy - hy.mean(0)) ** 2).sum().item()
            cost[a][b] = sse / max(sst, 1e-12)
    return cost


def p2(device, size, batch, n_images, repeats, sgd_steps):
    models = pool_models(5, size, device)
    batches = [fake_batch(batch, size, device, seed=i)[0] for i in range(max(2, n_images // batch))]
    forwards_only(models, batches)  # warm-up
    t_cost, t_fwd = [], []
    for _ in range(repeats):
        t_fwd.append(timed(lambda: forwards_only(models, batches), device))
        t_cost.append(timed(lambda: mtpd.adaptation_costs(feature_batches(models, batches)), device))
    # exact vs SGD on the same cached features (the forwards are common to both and left out)
    feats = list(feature_batches(models, batches))
    t_exact = timed(lambda: mtpd.adaptation_costs(iter(feats)), device)
    exact = mtpd.adaptation_costs(iter(feats))
    t0 = time.perf_counter()
    sgd = sgd_costs(feats, sgd_steps)
    sync(device)
    t_sgd = time.perf_counter() - t0
    pairs = [(a, b) for a in sgd for b in sgd[a]]
    return {"p2_cost_vs_forward_ratio": statistics.median(t_cost) / statistics.median(t_fwd),
            "p2_sgd_speedup": t_sgd / t_exact,
            "p2_sgd_loss_ratio": sum(exact[a][b] for a, b in pairs) / sum(sgd[a][b] for a, b in pairs),
            "p2_sgd_steps": sgd_steps}


def cost_scaling(device, size, batch, n_images):
    """Time of the full cost matrix for N models, against N models' forwards: flat ratio = linear."""
    out = {}
    batches = [fake_batch(batch, size, device, seed=i)[0] for i in range(max(2, n_images // batch))]
    for n in (2, 4, 8):
        models = pool_models(n, size, device)
        forwards_only(models, batches[:1])
        t_fwd = timed(lambda: forwards_only(models, batches), device)
        t_cost = timed(lambda: mtpd.adaptation_costs(feature_batches(models, batches)), device)
        out[str(n)] = {"cost_s": t_cost, "forward_s": t_fwd, "ratio": t_cost / t_fwd}
    return out


# ---------------------------------------------------------------------------------------------------------
# P3: peak memory, each configuration in a fresh process. P4: the exported student costs nothing extra.
# ---------------------------------------------------------------------------------------------------------
def proc_status(key):
    """A memory figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def mem_worker(mode, device, size, batch, steps):
    """Runs in a subprocess: student + teacher resident; 'plain' = student steps and teacher forwards,
    'distill' = distillation steps. Prints the peak memory the steps added (bytes)."""
    images, targets = fake_batch(batch, size, device)
    student = detector("retinanet_r18", 0.5, size, device)
    teacher = mtpd.freeze(detector("retinanet_r50", 1.0, size, device))
    m, opt, sched, params = stage(student, [teacher] if mode == "distill" else [], images)

    def work():
        engine.train_step(m, opt, sched, params, images, targets, "fp32", RECIPE["clip"])
        if mode == "plain":
            with torch.no_grad():
                fpn_features(teacher, images)

    work()  # warm-up: optimiser state and allocator caches exist before the measurement starts
    sync(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: reset the process's peak resident set (VmHWM) to its current size, then read it after
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = proc_status("VmRSS")
    for _ in range(steps):
        work()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else proc_status("VmHWM")
    print(json.dumps({"added_bytes": peak - base, "peak_bytes": peak}))


def p3(device, size, batch, steps):
    res = {}
    for mode in ("plain", "distill"):
        r = subprocess.run([sys.executable, __file__, "--mem-worker", mode, "--device", device.type,
                            "--size", str(size), "--batch", str(batch), "--steps", str(steps)],
                           capture_output=True, text=True, check=True)
        res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    # The peak of the whole process (both models resident in both). On a CPU the part the steps add
    # (`added_bytes`) is also reported, but glibc's allocator makes it vary by tens of MB between runs.
    return {"p3_peak_mem_ratio": res["distill"]["peak_bytes"] / res["plain"]["peak_bytes"],
            "p3_added_mem_ratio": res["distill"]["added_bytes"] / max(res["plain"]["added_bytes"], 1),
            "p3": res}


def p4(device, size, batch, repeats):
    images, targets = fake_batch(batch, size, device)
    student = detector("retinanet_r18", 0.5, size, device)
    teacher = mtpd.freeze(detector("retinanet_r50", 1.0, size, device))
    m, opt, sched, params = stage(student, [teacher], images)
    # one real distillation step
    engine.train_step(m, opt, sched, params, images, targets, "fp32", RECIPE["clip"])
    m.hook.remove()
    exported = engine.build(engine.make_spec("s", "retinanet_r18", 0.5, size, [1, 2, 3, 5, 8], **SMALL))
    exported.load_state_dict(student.state_dict(), strict=True)  # what student.pt holds
    exported.to(device).eval()
    plain = detector("retinanet_r18", 0.5, size, device).eval()
    with torch.no_grad():
        run = {"exported": lambda: exported(images), "plain": lambda: plain(images)}
        for fn in run.values():
            fn()
        t = {k: [] for k in run}
        for _ in range(repeats):
            for k, fn in run.items():
                t[k].append(timed(fn, device))
    return {"p4_param_ratio": count_params(exported) / count_params(plain),
            "p4_latency_ratio": statistics.median(t["exported"]) / statistics.median(t["plain"])}


def main():
    ap = argparse.ArgumentParser(description="mtpd benchmark: ratios measured side by side")
    ap.add_argument("--quick", action="store_true", help="small sizes: about 5 minutes on 2 CPU cores")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--out", default="bench.json", help="where to write the figures")
    ap.add_argument("--mem-worker", choices=["plain", "distill"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help="image size (default 128 quick, 256 full)")
    ap.add_argument("--batch", type=int, default=8, help="images per batch")
    ap.add_argument("--steps", type=int, default=5, help="steps per memory measurement")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = args.size or (128 if args.quick else 256)
    torch.manual_seed(0)
    if args.mem_worker:
        return mem_worker(args.mem_worker, device, size, args.batch, args.steps)
    reps = 10 if args.quick else 20
    t0 = time.time()
    res = {"device": (torch.cuda.get_device_name() if device.type == "cuda"
                      else f"cpu x{torch.get_num_threads()}"),
           "size": size, "batch": args.batch, "torch": torch.__version__}
    res.update(p1(device, size, args.batch, reps))
    low, _ = engine.choose_precision(device, "auto")
    if device.type == "cuda" and low != "fp32":  # the low precision auto picks there, channels_last
        fast = p1(device, size, args.batch, reps, low)
        res["cuda_fast"] = dict(fast, precision=low)
        res["cuda_fast_speedup_distill"] = fast["images_per_s_distill"] / res["images_per_s_distill"]
    res.update(p7(device, size, args.batch, reps))
    res.update(p8(device, size, args.batch, reps))
    res.update(p2(device, size, args.batch, 64 if args.quick else 128, 3 if args.quick else 5,
                  sgd_steps=500 if args.quick else 2000))
    res["cost_scaling"] = cost_scaling(device, size, args.batch, 32 if args.quick else 64)
    res.update(p3(device, size, args.batch, args.steps))
    res.update(p4(device, size, args.batch, reps))
    res["wall_s"] = round(time.time() - t0, 1)
    engine.save_json(args.out, res)
    goals = {"p1_distill_step_ratio": "<= 1.10", "p2_cost_vs_forward_ratio": "<= 1.3",
             "p2_sgd_speedup": ">= 10", "p2_sgd_loss_ratio": "<= 1.0", "p3_peak_mem_ratio": "<= 1.10",
             "p4_param_ratio": "= 1.0", "p4_latency_ratio": "= 1.0 (noise)", "p7_train_student": ">= 1.0",
             "p7_train_teacher": ">= 1.0", "p7_eval_student": ">= 1.0", "p7_eval_teacher": ">= 1.0",
             "p8_teacher_share_cached": "<= 0.2"}
    print(f"device {res['device']}, {size} px, batch {args.batch}; auto precision {res['auto_precision']}: "
          f"{res['auto_reason']}")
    for k, g in goals.items():
        print(f"{k:28s} {res[k]:8.3f}   goal {g}")
    for n, r in res["cost_scaling"].items():
        print(f"cost matrix, {n} models: {r['cost_s']:.2f} s = {r['ratio']:.2f} x their forwards")
    if "cuda_fast" in res:
        fast = res["cuda_fast"]
        print(f"{fast['precision']}+channels_last: distill {fast['images_per_s_distill']:.0f} img/s vs fp32 "
              f"{res['images_per_s_distill']:.0f} ({res['cuda_fast_speedup_distill']:.2f}x); P1 "
              f"{res['cuda_fast']['p1_distill_step_ratio']:.3f}")
    print(f"fused AdamW alone: student {res['p7_train_student_fused_only']:.2f}x, teacher "
          f"{res['p7_train_teacher_fused_only']:.2f}x the plain step; channels_last in float32: "
          f"{res['p7_train_student_fp32_channels_last']:.2f}x, "
          f"{res['p7_train_teacher_fp32_channels_last']:.2f}x")
    print(f"a bf16 step takes {res['p7_bf16_vs_fp32_student']:.2f}x (student), "
          f"{res['p7_bf16_vs_fp32_teacher']:.2f}x (teacher) the fused float32 step here")
    print(f"P8 with the teacher's forward at every step: {res['p8_teacher_share_forward']:.2f} of the step; "
          f"cached steps are {res['p8_cached_vs_forward_speedup']:.2f}x faster; filling costs "
          f"{res['p8_fill_per_image_vs_step']:.2f} cached steps per image; the default data's cache "
          f"(800 images, 2 flips): {res['p8_cache_mib_default_data']:.0f} MiB")
    print(f"wrote {args.out} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
