"""The training engine behind train.py: torchrun/DDP helpers, loaders, checkpoints, the training loop
(with its CUDA fast path), evaluation and the cost matrix. Plain functions with explicit arguments; all
configuration (presets, flags) stays in train.py.

One process is the default. Under `torchrun --nproc_per_node N train.py ...` every rank runs the same
code: DDP wraps the student and its adapters, each rank keeps its own frozen teacher replica, data is
sharded with DistributedSampler, detections are gathered to rank 0 for COCOeval, and only rank 0 prints
and writes files.
"""
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import data
import mtpd
from models import build_detector, fpn_features


class InputError(Exception):
    """Bad input from the user: train.main prints it as one line and exits with code 2."""


def fail(msg):
    raise InputError(msg)


# ---------------------------------------------------------------------------------------------------------
# Distributed (torchrun): RANK/WORLD_SIZE/LOCAL_RANK in the environment; otherwise one process.
# ---------------------------------------------------------------------------------------------------------
def init_distributed(device):
    """Join the process group when started by torchrun. Returns the torch.device this rank uses."""
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")
    if "RANK" not in os.environ or dist.is_initialized():
        return torch.device(device, int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else torch.device(device)
    local = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.device("cuda", local) if device == "cuda" else torch.device("cpu")


def distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if distributed() else 0


def is_main():
    return rank() == 0


def barrier():
    if distributed():
        dist.barrier()


def from_main(obj):
    """Rank 0's value of `obj` on every rank (e.g. the cost matrix, so all ranks agree on the order)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


# ---------------------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------------------
def loaders(root, batch, seed, masks, device=torch.device("cpu"), workers=0):
    """(train loader, val loader). `batch` is per process. Under torchrun both are sharded by rank."""
    train = data.CocoDetection(root, "train", flip=True, masks=masks)
    val = data.CocoDetection(root, "val", masks=False)
    if len(train) == 0 or len(val) == 0:
        fail(f"{root} has an empty split ({len(train)} train, {len(val)} val images)")
    pin = device.type == "cuda"  # pinned host memory makes the non_blocking copies asynchronous
    common = dict(collate_fn=data.collate, num_workers=workers, pin_memory=pin,
                  persistent_workers=workers > 0)
    if distributed():
        ts = torch.utils.data.distributed.DistributedSampler(train, shuffle=True, seed=seed, drop_last=True)
        vs = torch.utils.data.distributed.DistributedSampler(val, shuffle=False)
        return (torch.utils.data.DataLoader(train, batch, sampler=ts, drop_last=True, **common),
                torch.utils.data.DataLoader(val, batch, sampler=vs, **common))
    g = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(train, batch, shuffle=True, drop_last=len(train) >= batch,
                                        generator=g, **common),
            torch.utils.data.DataLoader(val, batch, **common))


def cycle(loader):
    """Endless batches; under torchrun a new DistributedSampler shuffle each pass, the same on every rank."""
    sampler = loader.sampler if isinstance(loader.sampler, torch.utils.data.DistributedSampler) else None
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def reseed(loader, seed):
    """Fix the data order of the next passes over `loader` by `seed`."""
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.seed = seed
    else:
        loader.generator.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Models and checkpoints. A checkpoint is {model, spec, metrics}: the spec rebuilds the model alone.
# ---------------------------------------------------------------------------------------------------------
def make_spec(label, name, scale, size, category_ids, **kw):
    return dict(label=label, name=name, num_classes=len(category_ids) + 1, scale=scale, min_size=size,
                max_size=size, anchor_base=size // 8, category_ids=list(category_ids), **kw)


def build(spec):
    return build_detector(**{k: v for k, v in spec.items() if k not in ("label", "category_ids")})


def save(path, obj):
    """Atomic write on rank 0 (temp file in the same folder, fsync, rename): a crash leaves the old file
    intact. Every rank waits for it, so any rank may read the file right after."""
    if is_main():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(obj, f) if not isinstance(obj, (str, bytes)) else f.write(obj.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    barrier()


def save_json(path, obj):
    save(path, json.dumps(obj, indent=1))


def save_ckpt(path, model, spec, metrics, **extra):
    save(path, dict(model=model.state_dict(), spec=spec, metrics=metrics, **extra))


def load(path, device="cpu"):
    """Checkpoint -> (model, spec, metrics). Read with weights_only=True: a file carrying code is refused."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        model = build(ck["spec"])
        model.load_state_dict(ck["model"])
    except Exception as e:  # corrupt, truncated, pickled code, or weights that do not match the spec
        fail(f"cannot load checkpoint {path}: {str(e).splitlines()[0][:200]}")
    return model.to(device), ck["spec"], ck.get("metrics", {})


def jsonl(path):
    """A logger appending one JSON line per event (rank 0 only)."""
    def log(rec):
        if is_main():
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 1), **rec}) + "\n")
    return log


# ---------------------------------------------------------------------------------------------------------
# Training: one loop for plain training, a progressive stage (one teacher) and the ensemble (several).
# ---------------------------------------------------------------------------------------------------------
def lr_at(step, steps, warmup=50):
    """Linear warm-up, constant, then x0.1 for the last 15%: from scratch, decaying early hurts (METHOD §6)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 if step >= 0.85 * steps else 1.0


class Distilled(nn.Module):
    """What one training step differentiates, as one module so that DDP can wrap it: the student and its
    training-only adapters. Teachers are a plain list, not submodules: frozen, one replica per rank,
    never synchronised and never in the optimiser. forward(images, targets) -> loss dict (§3.1)."""

    def __init__(self, student, teachers, adapters, lam):
        super().__init__()
        self.student, self.adapters, self.teachers, self.lam = student, nn.ModuleList(adapters), teachers, lam
        self.feats, self.hook = mtpd.capture_features(student.backbone)

    def forward(self, images, targets):
        return mtpd.distill_losses(self.student, images, targets, self.feats, self.teachers,
                                   list(self.adapters), fpn_features, self.lam)


def train_step(step_module, opt, sched, params, images, targets, bf16=False):
    """One optimisation step of a Distilled module (or its DDP wrapper). Returns the loss dict, still on
    the device: reading a value is a host-device sync, so the caller does it only at log intervals."""
    with torch.autocast(images[0].device.type, torch.bfloat16, enabled=bf16):
        losses = step_module(images, targets)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 35.0)  # the official recipe's max-norm
    opt.step()
    sched.step()
    return losses


def train_loop(model, loader, steps, lr, device, seed, teachers=(), lam=1.0, desc="train", log=None,
               bf16=False, channels_last=False, compile=False):
    """Train `model` for `steps` iterations with a fresh AdamW and LR schedule (a fresh optimiser per
    stage, §3.2). With teachers, each gets a fresh adapter and the feature loss of §3.1 is added.
    bf16 / channels_last / compile: the CUDA fast path (autocast for student and teachers, NHWC
    convolutions, torch.compile of the backbones in place: state_dict keys do not change).
    Returns the mean detection loss over the last 20% of steps (§3.5 compares it with validation AP)."""
    torch.manual_seed(seed + rank())  # augmentation differs per rank; the data order is shared
    reseed(loader, seed)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    model.to(device, memory_format=fmt).train()
    teachers = [mtpd.freeze(t.to(device, memory_format=fmt)) for t in teachers]
    if compile:
        for m in [model] + teachers:
            m.backbone.compile(dynamic=True)
    adapters = []
    if teachers:  # adapter kinds from the shapes of one batch; fresh for this stage
        images = [im.to(device) for im in next(iter(loader))[0]]
        with torch.no_grad():
            model.eval()
            fs = fpn_features(model, images)
            adapters = [mtpd.build_adapters(fs, fpn_features(t, images)) for t in teachers]
            model.train()
    step_module = Distilled(model, teachers, adapters, lam).to(device, memory_format=fmt)
    hook = step_module.hook
    if distributed():  # gradients of the student and adapters are averaged over ranks
        step_module = nn.parallel.DistributedDataParallel(step_module, [device] if device.type == "cuda" else None)
    params = [p for p in step_module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps))
    tail, bar = [], tqdm(range(steps), desc=desc, leave=False, mininterval=1.0, disable=not is_main())
    batches = cycle(loader)
    try:
        for step in bar:
            images, targets = next(batches)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
            losses = train_step(step_module, opt, sched, params, images, targets, bf16)
            if step % 10 == 0 or step == steps - 1:  # read values (a host sync) only at log intervals
                vals = {k: v.item() for k, v in losses.items()}
                if not all(math.isfinite(v) for v in vals.values()):
                    fail(f"non-finite loss at step {step} of {desc}: {vals}")
                bar.set_postfix({k[:8]: f"{v:.3f}" for k, v in vals.items()})
                if step >= 0.8 * steps:
                    tail.append(sum(v for k, v in vals.items() if k != "distill"))
    finally:
        hook.remove()
    det = sum(tail) / max(len(tail), 1)
    if log:
        log({"event": "trained", "desc": desc, "steps": steps, "train_det_loss": det})
    return det


# ---------------------------------------------------------------------------------------------------------
# Evaluation: COCOeval on rank 0 over the detections of every rank.
# ---------------------------------------------------------------------------------------------------------
def evaluate(model, loader, device, progress=False):
    if not distributed():
        return data.evaluate(model, loader, device, progress)
    part = data.predict(model, loader, loader.dataset.category_ids, device)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    metrics = None
    if is_main():  # DistributedSampler pads with repeated images: keep each image's detections once
        owner, bbox, segm = {}, [], []
        for r, (b, s) in enumerate(parts):
            for det in b:
                if owner.setdefault(det["image_id"], r) == r:
                    bbox.append(det)
            segm += [d for d in s if owner[d["image_id"]] == r]
        metrics = data.score(loader.dataset.coco, bbox, segm)
    return from_main(metrics)


# ---------------------------------------------------------------------------------------------------------
# Adaptation costs over checkpoints (§3.2).
# ---------------------------------------------------------------------------------------------------------
def cost_matrix(models, dataset, n_images, device, batch=8):
    """d(a -> b) for every ordered pair of frozen `models` ({label: model}); the first half of the first
    `n_images` training images (in file order, no augmentation) fits the linear maps, the second half is
    held out. One forward per model per batch. Every rank gets rank 0's matrix."""
    for m in models.values():
        mtpd.freeze(m.to(device))
    subset = torch.utils.data.Subset(dataset, range(min(n_images, len(dataset))))
    loader = torch.utils.data.DataLoader(subset, batch, collate_fn=data.collate)

    def batches():
        seen = 0
        with torch.no_grad():
            for images, _ in tqdm(loader, desc="cost", leave=False, disable=not is_main()):
                split = "fit" if seen < len(subset) // 2 else "held"
                images = [im.to(device) for im in images]
                yield split, {k: {s: f.float() for s, f in fpn_features(m, images).items()}
                              for k, m in models.items()}
                seen += len(images)

    return from_main(mtpd.adaptation_costs(batches()))
