"""On a GPU: what the low precision buys at COCO's image sizes, and that it keeps the boxes. One distillation
stage (RetinaNet-R50 teacher at 1x, R50 student at 0.5x; the teacher run at every step, as COCO's mixed
sizes rule out the feature cache) in float32 and in what --precision auto picks, from the same weights
through the same batches: images/s, peak GPU memory, and the float32-trained student's boxes under the
low precision's autocast against its float32 boxes, matched by IoU.

    python experiments/gpu_check.py                 # CUDA
    python experiments/gpu_check.py --tiny --device cpu   # the same in seconds (R18, small images)
"""
import argparse
import json
import tempfile
import time

import torch
from torchvision.ops import box_iou

from common import train

engine, data = train.engine, train.data
FULL = dict(name="retinanet_r50", size=800, max_size=1333, sizes=[(800, 1066), (1066, 800), (800, 1200)],
            build={}, n=64, steps=300, batch=8)
TINY = dict(name="retinanet_r18", size=64, max_size=96, sizes=[(64, 85), (85, 64), (64, 96)],
            build=dict(fpn_channels=32, head_convs=1), n=4, steps=4, batch=2)


@torch.no_grad()
def boxes(model, images, precision):
    model.eval().to(memory_format=engine.memory_format(precision))
    with train.models.autocast(images[0].device, precision):
        return model(images)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="small images, R18, a few iterations")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args(argv)
    cfg, device = TINY if args.tiny else FULL, engine.init_distributed(args.device)
    low, why = engine.choose_precision(device)
    low = "bf16" if low == "fp32" else low  # compared all the same where emulated (slow)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "why": why}
    with tempfile.TemporaryDirectory() as root:
        data.make_shapes(root, cfg["n"], 4, sizes=cfg["sizes"], max_objects=12, progress=False)
        loader, val = engine.loaders(root, cfg["batch"], 0, False, device, 0 if args.tiny else 8)
        spec = engine.make_spec("m", cfg["name"], 1.0, cfg["size"], loader.dataset.category_ids,
                                cfg["max_size"], **cfg["build"])
        teacher, students = engine.build(spec, 1), {}
        for p in ("fp32", low):
            students[p] = engine.build(dict(spec, scale=0.5), 0)
            recipe = dict(train.RECIPE, precision=p, lam=1.0, normalize=True, resume=False,
                          ckpt_every=10 ** 9)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            engine.train(students[p], loader, cfg["steps"], device, 0, recipe, [teacher], desc=p)
            if device.type == "cuda":
                torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
            report[p] = {"images_per_s": cfg["steps"] * cfg["batch"] / (time.perf_counter() - t),
                         "peak_mib": peak}
        images = [val.dataset.load(i)[0].to(device) for i in range(len(val.dataset))]
        ref, other = boxes(students["fp32"], images, "fp32"), boxes(students["fp32"], images, low)
    dist = []
    for r, q in zip(ref, other):  # each float32 box against the low precision's of its class it overlaps most
        if len(r["boxes"]) and len(q["boxes"]):
            iou = box_iou(r["boxes"], q["boxes"]) * (r["labels"][:, None] == q["labels"][None])
            best, j = iou.max(1)
            dist += (r["boxes"][best > 0.9] - q["boxes"][j[best > 0.9]]).abs().amax(1).tolist()
    report.update(low=low, speedup=report[low]["images_per_s"] / report["fp32"]["images_per_s"],
                  pairs=len(dist), median_px=float(torch.tensor(dist or [float("nan")]).median()))
    data.atomic_write(args.out, lambda f: json.dump(report, f, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
