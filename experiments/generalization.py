"""§3.5: the distilled student generalises better, not optimises better. For the run's students at every
stage boundary (MTPD, and the same restarted schedule without a teacher), the training detection loss on
fixed batches against the validation AP; then the loss along filter-normalised random directions around
the final `long` and `mtpd` students (Li et al. 2018): the mean rise at a radius is its flatness.

    python experiments/generalization.py runs/default [--batches 4] [--points 11] [--directions 3]

RUN/generalization.json and .md (and .png with matplotlib).
"""
import argparse
import os

import torch

from common import md_table, on_run, pyplot, train, write
from mtpd import eval_mode


@torch.no_grad()
def detection_loss(model, batches, device):
    """The mean summed detection loss over `batches`: train mode (torchvision's losses), BatchNorm frozen."""
    total = 0.0
    with eval_mode(model):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        for images, targets in batches:
            total += float(sum(model([i.to(device) for i in images],
                                     [{k: v.to(device) for k, v in t.items() if torch.is_tensor(v)}
                                      for t in targets]).values()))
    return total / len(batches)


def direction(model, seed):
    """A Gaussian direction with each filter scaled to the norm of the weights' filter; biases and norms 0."""
    g, d = torch.Generator().manual_seed(seed), {}
    for name, w in model.named_parameters():
        r = torch.randn(w.shape, generator=g)
        if w.dim() <= 1:
            d[name] = torch.zeros_like(w)
            continue
        scale = w.detach().cpu().flatten(1).norm(dim=1) / (r.flatten(1).norm(dim=1) + 1e-10)  # [C_out]
        d[name] = (r * scale.view(-1, *[1] * (w.dim() - 1))).to(w)
    return d


def curve(model, batches, d, alphas, device):
    """The detection loss at w + a * d for each a; the weights are restored afterwards."""
    params = dict(model.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}
    out = []
    try:
        for a in alphas:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(base[n] + a * d[n])
            out.append(detection_loss(model, batches, device))
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(base[n])
    return out


def generalization(args, res, root, teachers, own):
    ckpts, k = os.path.join(args.out, "ckpt"), len(res["order"])
    ds = train.data.CocoDetection(root, "train", masks=False)
    batches = [train.data.collate([ds[i] for i in range(j, j + 8)]) for j in range(0, 8 * own.batches, 8)]
    points = {"long_restart": ["ots"] + [f"long_restart_stage{i + 1}" for i in range(k)],
              "mtpd": ["ots"] + [f"mtpd_stage{i + 1}" for i in range(k)]}
    gen = {}
    for row, labels in points.items():
        gen[row] = []
        for i, label in enumerate(labels):
            model, _, metrics = train.engine.load(os.path.join(ckpts, f"{label}.pt"), args.dev)
            loss = detection_loss(model, batches, args.dev)
            gen[row].append({"stage": i, "AP": metrics["AP"], "det_loss": loss})
    alphas = torch.linspace(-own.radius, own.radius, own.points).tolist()
    lands = {}
    for row in ("long", "mtpd"):
        long = "long.pt" if k == args.k else f"long_{k}x.pt"  # as long as MTPD's stages (train.reproduce)
        path = os.path.join(ckpts, long if row == "long" else f"mtpd_stage{k}.pt")
        model = train.engine.load(path, args.dev)[0]
        lands[row] = [curve(model, batches, direction(model, s), alphas, args.dev)
                      for s in range(own.directions)]
    mid = own.points // 2
    flat = {row: sum((c[0] + c[-1]) / 2 - c[mid] for c in cs) / len(cs) for row, cs in lands.items()}
    table = md_table(["student", "stage", "train detection loss", "val AP"],
                     [[row, p["stage"], f"{p['det_loss']:.3f}", f"{100 * p['AP']:.1f}"]
                      for row, ps in gen.items() for p in ps])
    text = (f"{table}\n\nFlatness (the mean rise of the loss at ±{own.radius} along {own.directions} "
            f"filter-normalised directions; lower is flatter): "
            + ", ".join(f"{row} {v:.3f}" for row, v in flat.items()))
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        for row, ps in gen.items():
            ax[0].plot([p["det_loss"] for p in ps], [100 * p["AP"] for p in ps], "o-", label=row)
        ax[0].set(xlabel="train detection loss", ylabel="val AP", title="§3.5: loss vs AP per stage")
        for row, cs in lands.items():
            ax[1].plot(alphas, [sum(c[i] for c in cs) / len(cs) for i in range(len(alphas))], label=row)
        ax[1].set(xlabel="step along a random direction", ylabel="detection loss", title="loss landscape")
        for a in ax:
            a.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "generalization.png"), dpi=120)
    write(os.path.join(args.out, "generalization"), {"generalization": gen, "alphas": alphas, "curves": lands,
                                                     "flatness": flat}, text)
    return flat


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a folder of `python train.py` (results.json)")
    ap.add_argument("--batches", type=int, default=4, help="fixed training batches of 8 images")
    ap.add_argument("--points", type=int, default=11, help="points along each direction")
    ap.add_argument("--directions", type=int, default=3)
    ap.add_argument("--radius", type=float, default=0.4)
    own, rest = ap.parse_known_args()
    on_run(own.run, rest, lambda *a: generalization(*a, own))
