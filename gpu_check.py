"""What the low-precision path buys on a GPU, and that it keeps the boxes: one distillation stage at COCO's
image sizes in float32 and in the precision `--precision auto` picks, side by side.

    python gpu_check.py                        # CUDA: RetinaNet-R50 teacher at 1x, R50 student at 0.5x
    python gpu_check.py --tiny --device cpu    # the same checks in seconds (R18, narrow FPN, small images)

It writes a synthetic COCO-format set of COCO's sizes (short side 800, aspect ratios 4:3, 3:4, 3:2, crowd
regions; --tiny: small images, few of them), trains the same student from the same weights through the
same batches once per precision (engine.train_loop, the teacher run at every step as on COCO, whose mixed
sizes rule out the feature cache), and reports images/s of the distillation step, the peak GPU memory,
and a box check: the float32-trained student's boxes under the low precision's autocast against its
float32 boxes on the same validation images, matched by IoU (their distance in px, and the share that
lies on the low precision's grid, where boxes decoded in it would). Prints a table, writes --out (JSON).
Where the device has no native low precision (`auto` picks float32: most CPUs), bf16 runs emulated.
"""
import argparse
import os
import resource
import sys
import tempfile
import time

import torch
from torchvision.ops import box_iou

import data
import engine
import models
from train import RECIPE

# COCO's common aspect ratios (4:3, 3:4, 3:2) at torchvision's short side of 800 px; scaled down for --tiny
COCO_SIZES = [(800, 1066), (1066, 800), (800, 1200)]
TINY_SIZES = [(64, 85), (85, 64), (64, 96)]
FULL = dict(teacher="retinanet_r50", student="retinanet_r50", min_size=800, max_size=1333, anchor_base=32,
            build={}, n_train=64, n_val=4, steps=300, batch=8)
TINY = dict(teacher="retinanet_r18", student="retinanet_r18", min_size=64, max_size=96, anchor_base=8,
            build=dict(fpn_channels=32, head_convs=1), n_train=4, n_val=2, steps=4, batch=2)


def get_args(argv):
    ap = argparse.ArgumentParser(description="one distillation stage at COCO's sizes in float32 and in "
                                 "the low precision: images/s, peak memory, and the boxes compared")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true",
                    help="small images, R18 with a narrow FPN, a few iterations")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16"],
                    help="the low precision compared with float32 (auto: engine.choose_precision's pick)")
    ap.add_argument("--steps", type=int, help="iterations of the stage (default: 300; --tiny 4)")
    ap.add_argument("--batch", type=int, help="images per step (default: 8; --tiny 2)")
    ap.add_argument("--data", help="folder for the synthetic set (default: a temporary one)")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report")
    return ap.parse_args(argv)


def low_precision(device, asked):
    """(precision, why): choose_precision's pick; where that is float32 (no native bf16 or fp16), bf16
    emulated, so that the comparison is still made."""
    precision, why = engine.choose_precision(device, asked)
    if precision == "fp32":
        return "bf16", f"{asked} picks {why}; bf16 is compared with it all the same, emulated (slow)"
    return precision, why


NOT_DETECTION = ("event", "desc", "step", "distill", "distill_levels")  # a train_loop log record's other keys


def stage(spec_s, teacher, loaders, device, steps, precision, seed=0):
    """One distillation stage from the student's initial weights -> (student, measurements). images/s is
    timed between the first and the last logged iteration (train_loop logs every 10th and the last, after
    reading the losses, which waits for the device), so the first iteration's set-up is left out; the
    losses are those of the last iteration (det_loss: the detection terms, distill_loss: the L2 after lam).
    Peak memory: the GPU's for this stage; on a CPU only the process's peak RSS so far (it never drops)."""
    train_loader, _ = loaders
    student = engine.build(spec_s, seed)
    stamps, losses = [], {}

    def log(rec):
        if rec["event"] == "step":
            stamps.append((rec["step"], time.perf_counter()))
            detection = sum(v for k, v in rec.items() if k not in NOT_DETECTION)
            losses.update(det_loss=detection, distill_loss=rec["distill"])

    recipe = dict(RECIPE, precision=precision, cache=False, every=0, resume=False)  # cache: mixed sizes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.train_loop(student, train_loader, steps, device, seed, recipe, [teacher],
                      desc=f"stage ({precision})", log=log)
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    batch = train_loader.batch_sampler.batch
    return student, {
        "images_per_s": (s1 - s0) * batch / (t1 - t0) if s1 > s0 else None,
        "timed_steps": s1 - s0,
        "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **losses}


def on_grid(x, dtype):
    """Which of the values x are exactly representable in `dtype` (bfloat16: 8 significant bits)."""
    return x.to(dtype).float() == x


@torch.no_grad()
def box_check(model, images, device, precision, top=50, min_iou=0.9):
    """The model's boxes under `precision`'s autocast against its float32 boxes on the same images: each of
    the `top` highest-scoring float32 boxes per image is matched to the low-precision box of its class with
    the largest IoU, if >= `min_iou` (high: a box of the neighbouring anchor overlaps by 0.5 or more).
    Every box is kept (score threshold 0) so that an untrained model has boxes too; its scores are nearly
    equal, so many of its top boxes swap ranks under autocast and fall out of the other's 300 (a trained
    model's do not). Returns the share matched and the pairs, their largest coordinate distance in px
    (median, 90th percentile, max), and the share of the low-precision boxes' inner coordinates (not on
    the image border, >= 32 px, where bfloat16's grid is 0.25 px or coarser) on the low precision's grid
    (on_grid): a float32 box lands there by chance once in about 2^16 (bf16; 2^13 fp16), a box decoded in
    the low precision always does."""
    model.eval().to(device)
    thresh, model.score_thresh = model.score_thresh, 0.0
    images = [im.to(device) for im in images]
    try:
        model.to(memory_format=torch.contiguous_format)
        ref = model(images)
        model.to(memory_format=engine.memory_format(precision))
        with models.autocast(device, precision):
            low = model(images)
    finally:
        model.score_thresh = thresh
        model.to(memory_format=torch.contiguous_format)
    dist, matched, total, grid = [], 0, 0, []
    for r, q, im in zip(ref, low, images):
        keep = r["scores"].argsort(descending=True)[:top]
        rb, rl = r["boxes"][keep].float(), r["labels"][keep]
        qb = q["boxes"].float()
        total += len(rb)
        if len(rb) and len(qb):
            iou = box_iou(rb, qb) * (rl[:, None] == q["labels"][None, :])
            best, j = iou.max(1)
            ok = best >= min_iou
            matched += int(ok.sum())
            dist += (rb[ok] - qb[j[ok]]).abs().amax(1).tolist()
        h, w = im.shape[-2:]
        edge = torch.tensor([w, h, w, h], device=qb.device, dtype=qb.dtype)
        inner = (qb > 32) & (qb < edge - 1e-3)  # clipped to the border: on the grid whatever the precision
        grid.append(on_grid(qb[inner], models.DTYPES[precision]))
    grid = torch.cat(grid) if grid else torch.zeros(0, dtype=torch.bool)
    d = torch.tensor(dist or [float("nan")])
    return {"precision": precision, "boxes": total, "matched": matched / max(total, 1), "pairs": matched,
            "median_px": d.median().item(), "p90_px": d.quantile(0.9).item(), "max_px": d.max().item(),
            "on_grid": grid.float().mean().item() if grid.numel() else None, "inner_coords": grid.numel()}


def fail(msg):
    """Bad input: one line and exit code 2, as train.py."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    args = get_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu (with --tiny)")
    cfg = TINY if args.tiny else FULL
    steps, batch = args.steps or cfg["steps"], args.batch or cfg["batch"]
    if steps < 2 or batch < 1:
        fail(f"--steps must be at least 2 and --batch at least 1, got {steps} and {batch}")
    device = torch.device(args.device)
    low, why = low_precision(device, args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or os.path.join(tmp, "data")
        if not os.path.isfile(os.path.join(root, "annotations", "instances_val2017.json")):
            data.make_shapes(root, cfg["n_train"], cfg["n_val"], max_objects=12, seed=0,
                             progress=not args.tiny, sizes=TINY_SIZES if args.tiny else COCO_SIZES, crowd=0.3)
        workers = 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
        loaders = engine.loaders(root, batch, 0, False, device, workers)
        cats = loaders[0].dataset.category_ids
        sizes = dict(max_size=cfg["max_size"], anchor_base=cfg["anchor_base"], **cfg["build"])
        spec_t = engine.make_spec("teacher", cfg["teacher"], 1.0, cfg["min_size"], cats, **sizes)
        spec_s = engine.make_spec("student", cfg["student"], 0.5, cfg["min_size"], cats, **sizes)
        teacher = engine.build(spec_t, 1)
        runs, students = {}, {}
        for precision in ("fp32", low):
            students[precision], runs[precision] = stage(spec_s, teacher, loaders, device, steps, precision)
        val = loaders[1].dataset
        images = [val.load(i)[0] for i in range(min(4, len(val)))]
        check = box_check(students["fp32"], images, device, low)
    fp32, lo = runs["fp32"]["images_per_s"], runs[low]["images_per_s"]
    # the pairs' distances, not the share matched: a briefly trained model's top boxes swap ranks (box_check)
    check["ok"] = bool(check["pairs"] >= 10 and check["median_px"] <= 1.0
                       and (check["on_grid"] is None or check["on_grid"] < 0.05))
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tiny": args.tiny, "low_precision": low, "why": why,
              "teacher": f"{cfg['teacher']}@1x", "student": f"{cfg['student']}@0.5x", "image_sizes":
              TINY_SIZES if args.tiny else COCO_SIZES, "steps": steps, "batch": batch, "precisions": runs,
              "speedup": lo / fp32 if fp32 and lo else None, "box_check": check}
    print(f"device {report['device']}, {report['teacher']} -> {report['student']}, {steps} iterations of "
          f"{batch} images of {report['image_sizes']}\n{low}: {why}")
    print(f"{'':22s}{'fp32':>12s}{low:>12s}")
    for key, fmt in (("images_per_s", "{:12.2f}"), ("peak_mem_mib", "{:12.0f}"), ("det_loss", "{:12.4f}"),
                     ("distill_loss", "{:12.4f}")):
        print(f"{key:22s}" + "".join(fmt.format(runs[p][key]) if runs[p][key] is not None else f"{'n/a':>12s}"
                                      for p in ("fp32", low)))
    print(f"box check ({low} vs fp32, same weights and images): {check['matched']:.0%} of {check['boxes']} "
          f"boxes matched, distance median {check['median_px']:.3f} px, p90 {check['p90_px']:.3f}, max "
          f"{check['max_px']:.3f}; share on the {low} grid: {check['on_grid']}; "
          f"{'ok' if check['ok'] else 'FAILED'}")
    engine.save_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
