"""The numbers behind the paper's analyses, for any trained student (report.py draws them):

    detection_loss      the training objective on fixed batches, BatchNorm frozen       (§3.5)
    generalization      per stage: train detection loss vs validation AP                 (§3.5, Fig. 5a/b)
    loss landscape      loss along filter-normalised random directions, 1-D and 2-D      (§3.5, Fig. 5c/d)
    flatness            mean rise of the 1-D curves at a given radius: one number a model
    all orders          every teacher order of a small pool, sharing stages by prefix     (Table 2)

Plain functions over torchvision detectors; nothing here trains except through the function it is given.
"""
import itertools

import torch
from torch import nn

import mtpd


# ---------------------------------------------------------------------------------------------------------
# The objective on fixed batches (§3.5 compares it with validation AP).
# ---------------------------------------------------------------------------------------------------------
def fixed_batches(dataset, n_batches, batch):
    """The first n_batches * batch items of `dataset` (build it without augmentation), as
    (images, targets) lists: every model is scored on the very same images."""
    n = min(len(dataset), n_batches * batch)
    items = [dataset[i] for i in range(n)]
    return [tuple(map(list, zip(*items[i:i + batch]))) for i in range(0, n, batch)]


@torch.no_grad()
def detection_loss(model, batches, device="cpu"):
    """Mean summed detection loss of `model` over `batches` (a list of (images, targets)).

    torchvision detectors return losses only in train mode; BatchNorm is switched to eval inside it so
    the loss uses the running statistics (as validation does) and no statistic is updated. Every module's
    mode is restored afterwards (mtpd.eval_mode).
    """
    total = 0.0
    with mtpd.eval_mode(model):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        for images, targets in batches:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            total += float(sum(model(images, targets).values()))
    return total / len(batches)


# ---------------------------------------------------------------------------------------------------------
# Loss landscape (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"; paper Fig. 5c/d).
# ---------------------------------------------------------------------------------------------------------
def random_direction(model, seed):
    """A filter-normalised random direction: {parameter name: tensor like the parameter}.

    Each filter (slice along dim 0) of a Gaussian direction is rescaled to the norm of the same filter of
    the weights, so that models with different weight scales are compared at the same relative step.
    Biases and normalisation parameters (dim <= 1) get 0, as Li et al.'s 'ignore biasbn'.
    The seed fixes the direction up to that rescaling: two models get the same random draw.
    """
    g = torch.Generator().manual_seed(seed)
    d = {}
    for name, w in model.named_parameters():
        r = torch.randn(w.shape, generator=g, dtype=torch.float32)
        if w.dim() <= 1:
            d[name] = torch.zeros_like(w)
            continue
        wn = w.detach().float().flatten(1).norm(dim=1).cpu()  # [C_out]; the draw stays on the CPU
        rn = r.flatten(1).norm(dim=1)  # [C_out]
        d[name] = (r * (wn / (rn + 1e-10)).view(-1, *[1] * (w.dim() - 1))).to(w)  # then w's device, dtype
    return d


def loss_at(model, batches, directions, coords, device="cpu"):
    """detection_loss at w + sum_i coords[k][i] * directions[i], for each point coords[k].
    The weights are restored afterwards, whatever happens."""
    params = dict(model.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}
    out = []
    try:
        for c in coords:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(base[n] + sum(a * d[n] for a, d in zip(c, directions)))
            out.append(detection_loss(model, batches, device))
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(base[n])
    return out


def landscape(model, batches, radius=0.5, points=11, dirs_1d=3, points_2d=7, seed=0, device="cpu"):
    """1-D curves along `dirs_1d` directions and a 2-D grid over two more, both on [-radius, radius].

    Returns {"alphas": [points], "curves": [dirs_1d][points], "alphas_2d": [points_2d],
    "grid": [points_2d][points_2d] (row = 2nd direction), "loss0": loss at the weights themselves}.
    Direction seeds are seed, seed+1, ...: two models get the same draws, each normalised to its weights.
    """
    alphas = torch.linspace(-radius, radius, points).tolist()
    dirs = [random_direction(model, seed + i) for i in range(dirs_1d + 2)]
    curves = [loss_at(model, batches, [d], [[a] for a in alphas], device) for d in dirs[:dirs_1d]]
    a2 = torch.linspace(-radius, radius, points_2d).tolist()
    flat = loss_at(model, batches, dirs[dirs_1d:], [[a, b] for b in a2 for a in a2], device)
    grid = [flat[i * points_2d:(i + 1) * points_2d] for i in range(points_2d)]
    return {"alphas": alphas, "curves": curves, "alphas_2d": a2, "grid": grid,
            "loss0": detection_loss(model, batches, device)}


def flatness(land, radius):
    """Mean rise of the 1-D curves at +-radius over the loss at the weights: lower is flatter.
    The grid point nearest `radius` is used."""
    alphas = land["alphas"]
    hi = min(range(len(alphas)), key=lambda i: abs(alphas[i] - radius))
    lo = min(range(len(alphas)), key=lambda i: abs(alphas[i] + radius))
    rises = [(c[lo] + c[hi]) / 2 - land["loss0"] for c in land["curves"]]
    return sum(rises) / len(rises)


# ---------------------------------------------------------------------------------------------------------
# All orders (Table 2): is BGS's order close to the best one?
# ---------------------------------------------------------------------------------------------------------
def all_orders(teachers, run_order):
    """Distil through every order of `teachers` (n! orders; keep n <= 4).

    run_order(order) -> [metrics dict (with 'AP') after each stage of `order`, first stage first]: one
    progressive distillation (mtpd.progressive_distillation). The caller caches each stage by its prefix,
    so orders that share a prefix share its stages: sum_l n!/(n-l)! stages, not n * n!.
    Returns [{"order": [...], "AP": final AP, "stage_AP": [AP after each stage]}], best first.
    """
    rows = []
    for order in itertools.permutations(teachers):
        stage_ap = [m["AP"] for m in run_order(list(order))]
        rows.append({"order": list(order), "AP": stage_ap[-1], "stage_AP": stage_ap})
    return sorted(rows, key=lambda r: -r["AP"])


def rank_of(rows, order):
    """1-based rank of `order` among all_orders' rows (ties share the better rank); None if absent."""
    mine = next((r["AP"] for r in rows if r["order"] == list(order)), None)
    return None if mine is None else 1 + sum(r["AP"] > mine for r in rows)


# ---------------------------------------------------------------------------------------------------------
# Both analyses of §3.5 for a set of students.
# ---------------------------------------------------------------------------------------------------------
def generalization_and_flatness(paths, final, load, evaluate, batches, radii=(0.2, 0.4), device="cpu",
                                **land):
    """paths: {student name: [(iterations after OTS, checkpoint loader key, known metrics or None)]}, the
    points of each student at the stage boundaries; final: {name: key} of the students whose landscape
    is drawn. load(key) -> model; evaluate(model) -> metrics with 'AP' (called only when not known).
    Returns {"generalization": {name: [{step, AP, det_loss}]}, "landscape": {name: landscape()},
    "flatness": {name: {radius: mean rise}}}; `land` goes to landscape().
    """
    gen = {}
    for name, points in paths.items():
        gen[name] = []
        for step, key, metrics in points:
            model = load(key).to(device)
            ap = (metrics or evaluate(model))["AP"]
            gen[name].append({"step": step, "AP": ap, "det_loss": detection_loss(model, batches, device)})
    lands = {name: landscape(load(key).to(device), batches, device=device, **land)
             for name, key in final.items()}
    return {"generalization": gen, "landscape": lands,
            "flatness": {name: {str(r): flatness(ld, r) for r in radii} for name, ld in lands.items()}}
