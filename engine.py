"""The training engine behind train.py: torchrun/DDP helpers, the precision chosen by the device, loaders,
checkpoints, the training loop (with its teacher-feature cache), evaluation and the cost matrix. Plain
functions with explicit arguments; all configuration (presets, flags) stays in train.py.

One process is the default. Under `torchrun --nproc_per_node N train.py ...` every rank runs the same
code: DDP wraps the student and its adapters, each rank keeps its own frozen teacher replica, each rank
reads its share of every pass (Batches; validation via DistributedSampler), detections are gathered to
rank 0 for COCOeval, and only rank 0 prints and writes files.
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
import mechanisms
import mtpd
from models import autocast, build_detector, fpn_features, inherit


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
        return (torch.device(device, int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda"
                else torch.device(device))
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
# Precision, chosen by the machine: low precision only where the device computes it natively.
# ---------------------------------------------------------------------------------------------------------
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _native(device, precision):
    """(native, what the device is): whether `device` computes `precision` natively. A CPU asks oneDNN
    (AVX-512 BF16 / AMX; without it, bf16 and fp16 are emulated and several times slower than float32); a
    GPU asks for tensor cores of that type (bf16 from Ampere on; fp16 from Volta on; pre-Ampere GPUs
    emulate bf16)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
        return (major >= 8 if precision == "bf16" else major >= 7), name
    probe = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    try:
        native = bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        native = False
    return native, f"this CPU ({torch.backends.cpu.get_cpu_capability()})"


def choose_precision(device, asked="auto"):
    """(precision, the reason in words): 'bf16', 'fp16' (autocast with a GradScaler) or 'fp32'.
    auto: bf16 where the device computes it natively, else fp16 on a GPU with fp16 tensor cores, else
    float32. A precision asked for runs as asked; the reason then says when it is emulated (slow) here."""
    if asked not in PRECISIONS:
        fail(f"--precision must be one of {', '.join(PRECISIONS)}, got {asked}")
    if asked == "fp32":
        return "fp32", "float32, as asked (--precision fp32)"
    if asked != "auto":
        native, what = _native(device, asked)
        slow = "" if native else f"; {what} has no native {asked}: expect several times float32's step time"
        return asked, f"{asked} autocast, as asked (--precision {asked}){slow}"
    bf16, what = _native(device, "bf16")
    if bf16:
        return "bf16", f"bf16 autocast: {what} computes bfloat16 natively (--precision fp32 for float32)"
    if device.type == "cuda" and _native(device, "fp16")[0]:
        return "fp16", f"fp16 autocast with a GradScaler: {what} has fp16 but no bf16 tensor cores"
    return "fp32", f"float32: {what} has no native bfloat16, where bf16 runs several times slower"


def memory_format(precision):
    """channels_last where it measurably helps: with bf16/fp16 autocast (oneDNN's and the tensor cores'
    layout); in float32 on a CPU it made the student's step slower (RESULTS.md, bench.py P7)."""
    return torch.preserve_format if precision == "fp32" else torch.channels_last


# ---------------------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------------------
class Batches(torch.utils.data.Sampler):
    """Endless training batches (lists of indices) whose order is a pure function of (seed, iteration).
    Under torchrun each rank owns a fixed shard of the images (every world-th one, `shard`), so that it
    caches the teacher features of its own images only; pass e over a shard is a permutation seeded by
    (seed, e). A run resumed at iteration `start` sees exactly the batches the uninterrupted run saw,
    without loading the skipped images. len() is the number of batches per pass (per rank)."""

    def __init__(self, n, batch, seed=0, start=0):
        self.n, self.batch, self.seed, self.start = n, batch, seed, start
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
        self.shard = torch.arange(self.rank, n, self.world)  # this rank's images
        self.per_pass = max(1, (n // self.world) // batch)

    def __len__(self):
        return self.per_pass

    def __iter__(self):
        step = self.start
        while True:
            epoch, i = divmod(step, self.per_pass)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # one process: a permutation of all
            mine = self.shard[torch.randperm(len(self.shard), generator=g)]
            yield mine[i * self.batch:(i + 1) * self.batch].tolist()
            step += 1


def loaders(root, batch, seed, masks, device=torch.device("cpu"), workers=0):
    """(train loader, val loader). `batch` is per process; the train loader never ends (see Batches).
    Under torchrun the val loader is sharded by rank."""
    try:
        train = data.CocoDetection(root, "train", flip=True, masks=masks)
        val = data.CocoDetection(root, "val", masks=False)
    except ValueError as e:  # a missing or malformed annotation file, a missing image
        fail(str(e))
    if len(train) == 0 or len(val) == 0:
        fail(f"{root} has an empty split ({len(train)} train, {len(val)} val images); both need images")
    pin = device.type == "cuda"  # pinned host memory makes the non_blocking copies asynchronous
    common = dict(collate_fn=data.collate, num_workers=workers, pin_memory=pin,
                  persistent_workers=workers > 0)
    # its own generator: creating an iterator then draws its worker seed from it, not from the global
    # RNG that the flips use (otherwise a resumed run would flip differently)
    train_loader = torch.utils.data.DataLoader(train, batch_sampler=Batches(len(train), batch, seed),
                                               generator=torch.Generator().manual_seed(seed), **common)
    vs = torch.utils.data.distributed.DistributedSampler(val, shuffle=False) if distributed() else None
    return train_loader, torch.utils.data.DataLoader(val, batch, sampler=vs, **common)


# ---------------------------------------------------------------------------------------------------------
# Models and checkpoints. A checkpoint is {model, spec, metrics}: the spec rebuilds the model alone.
# ---------------------------------------------------------------------------------------------------------
def make_spec(label, name, scale, size, category_ids, max_size=None, anchor_base=None, **kw):
    """What rebuilds a model: build_detector's arguments plus its label and the data's category ids.
    Defaults for the built-in data (square images of `size`); COCO: size 800, max_size 1333,
    anchor_base 32."""
    return dict(label=label, name=name, num_classes=len(category_ids) + 1, scale=scale, min_size=size,
                max_size=max_size or size, anchor_base=anchor_base or size // 8,
                category_ids=list(category_ids), **kw)


def build(spec, seed=None):
    """The detector a spec describes; with `seed`, its random initialisation is fixed by it (torch's
    default generator starts from a random state in every process)."""
    if seed is not None:
        torch.manual_seed(seed)
    return build_detector(**{k: v for k, v in spec.items() if k not in ("label", "category_ids")})


def save(path, obj):
    """Atomic write on rank 0 (data.atomic_write: a crash leaves the old file intact) of a torch object or a
    string. Every rank waits for it, so any rank may read the file right after."""
    if is_main():
        if isinstance(obj, str):
            data.atomic_write(path, lambda f: f.write(obj))
        else:
            data.atomic_write(path, lambda f: torch.save(obj, f), mode="wb")
    barrier()


def discard(path):
    """Remove a file on rank 0 (a finished stage's resume state); every rank waits."""
    if is_main() and os.path.isfile(path):
        os.remove(path)
    barrier()


def save_json(path, obj):
    save(path, json.dumps(obj, indent=1))


def save_ckpt(path, model, spec, metrics, **extra):
    """A plain float32 state_dict (contiguous, whatever memory format training used) with its spec."""
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save(path, dict(model=weights, spec=spec, metrics=metrics, **extra))


def read(path):
    """torch.load with weights_only=True (tensors, dicts, lists, numbers only: a file carrying pickled
    code is refused) and one-line errors."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            fail(f"refused to load {path}: it holds pickled Python objects, which can run code; mtpd files "
                 "hold only tensors and plain values (re-save just the state_dict)")
        fail(f"cannot read checkpoint {path} (corrupt or truncated?): {str(e).splitlines()[0][:160]}")


def load(path, device="cpu"):
    """Checkpoint -> (model, spec, metrics); the model is rebuilt from the spec the file carries."""
    ck = read(path)
    if not isinstance(ck, dict) or "spec" not in ck or "model" not in ck:
        fail(f"{path} is not an mtpd checkpoint (no spec/model); exported students are loaded with "
             "engine.build(spec from student_spec.json).load_state_dict(...)")
    try:
        model = build(ck["spec"])
        model.load_state_dict(ck["model"])
    except Exception as e:  # weights that do not match the spec
        fail(f"checkpoint {path} does not match its spec {ck['spec'].get('name')}: "
             f"{' '.join(str(e).split())[:200]}")
    st = os.stat(path)
    model.source = (os.path.abspath(path), st.st_mtime_ns, st.st_size)  # identifies it to teacher_cache
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
def lr_at(step, steps, recipe):
    """The LR factor at `step` of `steps`: linear warm-up over recipe['warmup'] iterations, constant, then
    x recipe['drop'] from the fraction recipe['drop_at'] on (from scratch, decaying early hurts: cosine
    decay lost to a constant LR, RESULTS.md)."""
    if step < recipe["warmup"]:
        return (step + 1) / recipe["warmup"]
    return recipe["drop"] if step >= recipe["drop_at"] * steps else 1.0


class Distilled(nn.Module):
    """What one training step differentiates, as one module so that DDP can wrap it: the student, its
    training-only adapters and the mechanisms' learnable parts (§3.4; None for the L2). Teachers are a
    plain list, not submodules: frozen, one replica per rank, never synchronised and never in the
    optimiser. forward(images, targets) -> loss dict (§3.1).
    precision: the teachers' no-grad forwards run under its autocast (see choose_precision; the feature loss
    is float32 all the same). caches: one per teacher, None or a FeatureCache (teacher_cache) that
    replaces that teacher's forward by a look-up of its features for each (image, flip)."""

    def __init__(self, student, teachers, adapters, lam, mechs=None, precision="fp32", caches=None):
        super().__init__()
        self.student, self.adapters, self.teachers, self.lam = student, nn.ModuleList(adapters), teachers, lam
        self.mechs = nn.ModuleList(mechs) if mechs is not None else None
        # boxes in each teacher's frame cost a second resize of the batch: only for mechanisms that use them
        uses_boxes = any(getattr(m, "needs_boxes", False) for d in mechs or [] for m in d.values())
        self.boxes = input_boxes if uses_boxes else None
        self.feats, self.hook = mtpd.capture_features(student.backbone, student.transform)
        self.levels = {}  # stride -> this step's feature loss at that level (tensors, read when logging)
        self.precision = precision
        self.caches = {id(t): c for t, c in zip(teachers, caches or [None] * len(teachers))}

    def forward(self, images, targets):
        self.levels.clear()

        def teacher_features(teacher, images):
            cache = self.caches[id(teacher)]
            if cache is not None:
                return cache.lookup(targets, images[0].device)
            with autocast(images[0].device, self.precision):
                return fpn_features(teacher, images)

        return mtpd.distill_losses(self.student, images, targets, self.feats, self.teachers,
                                   list(self.adapters), teacher_features, lam=self.lam,
                                   mechanisms=None if self.mechs is None else list(self.mechs),
                                   teacher_boxes=self.boxes, levels=self.levels)


# ---------------------------------------------------------------------------------------------------------
# The cache of teacher features. A teacher is frozen and the data have one augmentation (a flip), so its
# features of each (image, flip) are the same at every iteration of a stage, and of every stage and row
# that uses it: computed once, in one pass over the training set, they replace the teacher's forward
# (about as long as the student's whole training step for an R50 teacher), in any precision.
# ---------------------------------------------------------------------------------------------------------
_caches = {}  # what fixes a teacher's input and output (cache_key) -> FeatureCache, across stages and rows


class FeatureCache:
    """{(image_id, flipped): {stride: [C, h, w]}}; lookup stacks a batch's maps as float32. Under bf16 or
    fp16 the maps are kept in float16, which holds a bfloat16 value exactly within its range (8
    significant bits of 11; a map with a value beyond float16's range is kept in float32) and the
    float32 P6/P7 to ~5e-4; in float32 they stay float32, so a cached step computes the uncached one."""

    def __init__(self, maps, sizes):
        self.maps, self.sizes = maps, sizes  # sizes: (image_id, flipped) -> (h, w) in the teacher's frame

    def nbytes(self):
        return sum(f.numel() * f.element_size() for m in self.maps.values() for f in m.values())

    def lookup(self, targets, device):
        keys = [(t["image_id"], bool(t.get("flipped", False))) for t in targets]
        with torch.autocast(device.type, enabled=False):  # CPU autocast refuses to stack float16
            return mtpd.Levels({s: torch.stack([self.maps[k][s] for k in keys]).to(device).float()
                                for s in self.maps[keys[0]]}, [self.sizes[k] for k in keys])


def _half(x):
    """x in float16, or in float32 where float16 cannot hold it."""
    h = x.to(torch.float16)
    return h if torch.isfinite(h).all() else x.float()


def cache_refusal(dataset):
    """Why a teacher's features of `dataset` cannot be cached (a sentence), or None. The cache holds one map
    per (image, flip): valid only when the flip is the data's only augmentation (CocoDetection declares
    its `augmentations`) and all images have one size (a batch is padded to its largest image, so a
    teacher's map of an image depends on the other images of its batch)."""
    augmentations = getattr(dataset, "augmentations", None)
    if augmentations is None or not hasattr(dataset, "load"):
        return (f"the {type(dataset).__name__} dataset declares no `augmentations` and `load(index, flip)`, "
                "so a cached map could differ from the teacher's map of the augmented image")
    others = [a for a in augmentations if a != "hflip"]
    if others:
        return (f"the training data has augmentations besides the horizontal flip ({', '.join(others)}): "
                "a teacher's map of an image changes from step to step")
    if dataset.one_size() is None:
        return ("the training images differ in size (each batch is padded to its largest image, so a "
                "teacher's map depends on the batch)")
    return None


def cache_key(teacher, dataset, indices, strides, device, precision):
    """What fixes a cached teacher's maps: its checkpoint, its input transform (sizes, padding,
    normalisation), the images (dataset, this rank's shard) and their augmentation, the levels, the device
    and the precision."""
    t = teacher.transform
    transform = (t.min_size, t.max_size, t.size_divisible, t.fixed_size, tuple(t.image_mean),
                 tuple(t.image_std))
    where = (getattr(dataset, "root", None), getattr(dataset, "split", None), len(dataset),
             tuple(getattr(dataset, "augmentations", ())))
    return (getattr(teacher, "source", None), transform, where, tuple(indices), tuple(strides), str(device),
            precision)


@torch.no_grad()
def teacher_cache(teacher, dataset, strides, device, precision, batch=8, desc="cache", indices=None,
                  limit_gib=2.0):
    """The FeatureCache of `teacher` on the training images `indices` (default: all; under torchrun this
    rank's shard, Batches.shard), unflipped and flipped, at `strides` (the levels the loss uses), computed
    as in training (same resizing and padding, the precision's autocast); or None, with one line saying
    why, when it cannot stand in for the forward (cache_refusal) or would take more than `limit_gib` for
    this teacher (--cache-gib). A teacher loaded from a checkpoint (engine.load) is cached once per process
    for what fixes its input (cache_key)."""
    indices = range(len(dataset)) if indices is None else [int(i) for i in indices]
    key = cache_key(teacher, dataset, indices, strides, device, precision)
    if key[0] is not None and key in _caches:
        return _caches[key]
    why = cache_refusal(dataset)
    if why:
        if is_main():
            print(f"{desc}: teacher features not cached: {why}; the teacher runs at every step")
        return None
    items = [(i, flip) for i in indices for flip in (False, True)]
    maps, sizes, limit = {}, {}, limit_gib * 2 ** 30
    keep = _half if precision != "fp32" else (lambda x: x.float())  # exact in float32, see FeatureCache
    for j in tqdm(range(0, len(items), batch), desc=desc, leave=False, disable=not is_main()):
        pairs = [dataset.load(i, flip) for i, flip in items[j:j + batch]]
        images = [im.to(device) for im, _ in pairs]
        with autocast(device, precision):
            feats = fpn_features(teacher, images)
        for n, (_, t) in enumerate(pairs):
            maps[(t["image_id"], t["flipped"])] = {s: keep(feats[s][n]) for s in strides}
            sizes[(t["image_id"], t["flipped"])] = feats.sizes[n]
        need = FeatureCache(maps, sizes).nbytes() * len(items) / len(pairs) if j == 0 else 0
        if need > limit:  # estimated from the first batch, before filling the rest
            if is_main():
                print(f"{desc}: teacher features not cached: they need {need / 2 ** 30:.2f} GiB, over the "
                      f"{limit_gib:g} GiB cache limit (--cache-gib); the teacher runs at every step")
            return None
    cache = FeatureCache(maps, sizes)
    if key[0] is not None:
        _caches[key] = cache
    return cache


def input_boxes(model, images, targets):
    """The targets' boxes in the frame of `model`'s padded input batch: its transform resizes each image
    (FGD's masks are then boxes / stride, which is right under padding too). -> list of [n_i, 4]."""
    _, resized = model.transform(images, [{"boxes": t["boxes"]} for t in targets])
    return [t["boxes"] for t in resized]


def stage_adapters(student, teachers, images, mechanism="l2", published=False, conv=False):
    """A stage's training-only modules: one nn.ModuleDict of adapters per teacher (mtpd.make_adapters; conv:
    a learned 1x1 conv even where the widths match); and, for a mechanism other than the L2, one
    ModuleDict of its per-level modules per teacher, at the teacher's width (the adapter maps the student
    to it), else None."""
    adapters = [mtpd.make_adapters(student, t, images, fpn_features, conv=conv) for t in teachers]
    if mechanism == "l2":
        return adapters, None
    return adapters, [nn.ModuleDict({k: mechanisms.make(mechanism, a[k].channels, published) for k in a})
                      for a in adapters]


@torch.no_grad()
def init_lstsq_adapters(student, teachers, adapters, dataset, device, n_images, batch=8):
    """--adapter lstsq: each teacher's 1x1-conv adapters start at the least-squares map from the student's
    levels to the teacher's (mtpd.least_squares_adapters), fitted on the first `n_images` training images
    (file order, unflipped, as the cost matrix), the student in eval mode (its BatchNorm statistics are
    left alone), in float32."""
    n = min(n_images, len(dataset))
    with mtpd.eval_mode(student):
        moments = [{} for _ in teachers]
        for j in range(0, n, batch):
            images = [(dataset.load(i, False) if hasattr(dataset, "load") else dataset[i])[0].to(device)
                      for i in range(j, min(j + batch, n))]
            fs = float32(fpn_features(student, images))
            for m, t in zip(moments, teachers):
                mtpd.accumulate_moments(m, "fit",
                                        {"student": fs, "teacher": float32(fpn_features(t, images))})
        for m, a in zip(moments, adapters):
            mtpd.least_squares_adapters(a, m, "student", "teacher")


def train_step(step_module, opt, sched, params, images, targets, precision, clip, scaler=None):
    """One optimisation step of a Distilled module (or its DDP wrapper) under the precision's autocast,
    gradients clipped to the max-norm `clip`. scaler: fp16's GradScaler (the loss is scaled so that small
    gradients survive float16; a step with inf/NaN gradients is skipped and the scale lowered). Returns
    the loss dict, still on the device: reading a value is a host-device sync, so the caller does it
    only at log intervals."""
    with autocast(images[0].device, precision):
        losses = step_module(images, targets)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()
    sched.step()
    return losses


def adamw(params, lr, weight_decay, fused=False):
    """AdamW. fused: one kernel for all parameters instead of a loop over them (faster on a CPU as on a GPU,
    in any precision: bench.py P7). A device without the fused kernel falls back to the loop, with one
    line."""
    params = list(params)
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError) as e:
            if is_main():
                print(f"fused AdamW unavailable ({str(e).splitlines()[0][:100]}); using the plain one")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_loop(model, loader, steps, device, seed, recipe, teachers=(), *, desc="train", log=None, state=None,
               snapshots=None, mechanism="l2", inherit_first=False):
    """Train `model` for `steps` iterations with a fresh AdamW and LR schedule (a fresh optimiser per
    stage, §3.2). With teachers, each gets a fresh adapter and the feature loss of §3.1 is added, or,
    with `mechanism` in mechanisms.NAMES other than 'l2', that mechanism's loss (fresh modules too, §3.4).

    recipe: train.RECIPE with a run's own values. lr, weight_decay, warmup, drop_at, drop, clip: the
    optimiser and schedule (lr_at). lam, adapter, adapter_images, published: the distillation (train.py
    says what each means). How it runs:
    - precision: 'bf16', 'fp16' or 'fp32' (choose_precision): student and teachers run under its
      autocast, in channels_last with bf16/fp16 (memory_format); the feature loss, the anchors, P6/P7
      and the boxes stay float32; fp16 adds a GradScaler.
    - fused: fused AdamW. cache: with the L2, each teacher's features cached for the whole training set
      (teacher_cache, at most cache_gib GiB per teacher) instead of a forward per step.
    - every, resume: every `every` iterations the whole training state (weights, adapters, optimiser,
      schedule, iteration, RNG) is written atomically to the file `state`; with resume a state found there
      is continued, and on a CPU the result is identical to an uninterrupted run.
    snapshots: {iteration: file}: the student's state_dict after that many iterations (§3.5 compares a
    longer-trained student with the MTPD student at each stage boundary).
    inherit_first: before training, copy the first teacher's neck and head into the student where they
    play the same role (models.inherit; the authors' code does it before stage 1).
    Every 10 iterations `log` gets the detection terms and the feature loss per level (after lam).
    Returns {train_det_loss: the mean detection loss over the last 20% of steps (§3.5 compares it with
    validation AP), distill_ratio_start / distill_ratio_end: feature loss / detection loss at the first
    logged iteration and over the last 20% (with teachers)}."""
    resuming = bool(recipe["resume"] and state and os.path.isfile(state))  # weights, adapters, optimiser
    step_module = prepare(model, loader, device, seed, recipe, teachers, desc, mechanism, inherit_first,
                          resuming)
    params = [p for p in step_module.parameters() if p.requires_grad]
    opt = adamw(params, recipe["lr"], recipe["weight_decay"], fused=recipe["fused"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps, recipe))
    scaler = torch.amp.GradScaler(device.type) if recipe["precision"] == "fp16" else None
    run = {"step": 0, "tail": [], "ratios": []}  # what a resume state carries besides the weights
    if resuming:
        run = resume(state, step_module, opt, sched, scaler)
        print(f"{desc}: resumed at iteration {run['step']} of {steps} from {state}")
    loader.batch_sampler.start = run["step"]  # the batches of iterations start, start + 1, ...
    wrapped = step_module  # under torchrun, gradients of the student and adapters are averaged over ranks
    if distributed():
        wrapped = nn.parallel.DistributedDataParallel(step_module,
                                                      [device] if device.type == "cuda" else None)
    try:
        run_steps(wrapped, step_module, opt, sched, scaler, params, loader, steps, device, recipe, run,
                  desc=desc, log=log, state=state, snapshots=snapshots)
    finally:
        step_module.hook.remove()
    if distributed():  # DDP syncs buffers at the start of a forward, so each rank's last step left its own
        for b in model.buffers():  # BatchNorm statistics: evaluate what rank 0 saves, on every rank
            dist.broadcast(b, 0)
    return summary(step_module, run, steps, desc, log)


def prepare(model, loader, device, seed, recipe, teachers, desc, mechanism, inherit_first, resuming):
    """A stage's setup, in the order that fixes its random numbers: the seed, the models on the device,
    the first batch (read off for the adapters' shapes), inheriting, fresh adapters (and mechanism
    modules), their least-squares start, the teachers' feature caches. -> the Distilled module."""
    precision = recipe["precision"]
    model.__dict__.pop("source", None)  # its weights will differ from the file's: never a cached teacher
    torch.manual_seed(seed + rank())  # augmentation differs per rank; the data order is shared
    loader.batch_sampler.seed, loader.batch_sampler.start = seed, 0
    fmt = memory_format(precision)
    model.to(device, memory_format=fmt).train()
    teachers = [mtpd.freeze(t.to(device, memory_format=fmt)) for t in teachers]
    adapters, mechs, caches = [], None, None
    if teachers:  # fresh for this stage
        first = [im.to(device) for im in next(iter(loader))[0]]
        try:
            if inherit_first and not resuming:
                copied, of = inherit(model, teachers[0], first)
                if is_main():
                    print(f"{desc}: inherited {copied} of the student's {of} neck/head tensors from the "
                          "first teacher")
            adapters, mechs = stage_adapters(model, teachers, first, mechanism, recipe["published"],
                                             recipe["adapter"] in ("conv", "lstsq"))
            if recipe["adapter"] == "lstsq" and not resuming:  # a resumed state holds the trained adapters
                init_lstsq_adapters(model, teachers, adapters, loader.dataset, device,
                                    recipe["adapter_images"])
        except ValueError as e:  # no common FPN stride, nothing to inherit
            fail(f"cannot distil {desc}: {e}")
        if recipe["cache"] and mechanism == "l2":  # a mechanism other than the L2 reads the exact map
            sampler = loader.batch_sampler
            caches = [teacher_cache(t, loader.dataset, [int(k) for k in a], device, precision, sampler.batch,
                                    f"{desc} teacher {i + 1} features", sampler.shard, recipe["cache_gib"])
                      for i, (t, a) in enumerate(zip(teachers, adapters))]
    return Distilled(model, teachers, adapters, recipe["lam"], mechs, precision, caches).to(
        device, memory_format=fmt)


def resume(state, step_module, opt, sched, scaler):
    """Load a resume state written by save_state into the stage's modules and optimiser; -> its run dict."""
    ck = read(state)
    step_module.load_state_dict(ck["weights"])  # the student and its adapters
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"][rank()])
    return {"step": ck["step"], "tail": ck["tail"], "ratios": ck.get("ratios", [])}


def run_steps(wrapped, core, opt, sched, scaler, params, loader, steps, device, recipe, run, *, desc, log,
              state, snapshots):
    """The loop, from iteration run['step'] to `steps`: a step, every 10 iterations the losses read and
    logged (log_losses), the snapshots, every recipe['every'] iterations the resume state (save_state).
    wrapped: the Distilled module `core`, or its DDP wrapper."""
    bar = tqdm(range(run["step"], steps), desc=desc, leave=False, mininterval=1.0, disable=not is_main(),
               initial=run["step"], total=steps)
    batches = iter(loader)
    for step in bar:
        images, targets = next(batches)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
        losses = train_step(wrapped, opt, sched, params, images, targets, recipe["precision"], recipe["clip"],
                            scaler)
        if step % 10 == 0 or step == steps - 1:  # read values (a host sync) only at log intervals
            bar.set_postfix(log_losses(losses, core, step, steps, run, desc, log, state))
        if snapshots and step + 1 in snapshots:
            save(snapshots[step + 1], core.student.state_dict())
        every = recipe["every"]
        if state and every and ((step + 1) % every == 0 or step + 1 == steps):
            run["step"] = step + 1
            save_state(state, core, opt, sched, scaler, params, run, desc)


def log_losses(losses, core, step, steps, run, desc, log, state):
    """Read one step's losses: stop on a non-finite one, log the terms and the feature loss per level, keep
    the feature/detection ratio and the last 20%'s detection loss in `run`. -> the progress bar's text."""
    vals = {k: v.item() for k, v in losses.items()}
    if not all(math.isfinite(v) for v in vals.values()):
        fail(f"non-finite loss at iteration {step} of {desc}: {vals}; stopped, the last "
             f"checkpoint{' ' + state if state else ''} is kept (try a lower --lr)")
    detect = sum(v for k, v in vals.items() if k != "distill")
    levels = {str(s): core.lam * float(v) for s, v in core.levels.items()}
    if log:  # the detection terms and the distillation term per level (stride)
        log({"event": "step", "desc": desc, "step": step, **vals, "distill_levels": levels})
    if "distill" in vals:
        run["ratios"].append((step, vals["distill"] / max(detect, 1e-12)))
    if step >= 0.8 * steps:
        run["tail"].append(detect)
    return {k[:8]: f"{v:.3f}" for k, v in vals.items()}


def save_state(state, core, opt, sched, scaler, params, run, desc):
    """The whole training state after iteration run['step'], atomically, never over a good one with
    non-finite weights; every rank's RNG state, so that each resumes its own augmentation."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        fail(f"non-finite weights after iteration {run['step'] - 1} of {desc}; stopped, {state} is kept")
    rng = [None] * dist.get_world_size() if distributed() else None
    if distributed():
        dist.all_gather_object(rng, torch.get_rng_state())
    save(state, dict(weights=core.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     scaler=scaler.state_dict() if scaler is not None else {},
                     rng=rng or [torch.get_rng_state()], step=run["step"], tail=run["tail"],
                     ratios=run["ratios"], desc=desc))


def summary(core, run, steps, desc, log):
    """What train_loop returns (see there), logged as the 'trained' event."""
    out = {"train_det_loss": sum(run["tail"]) / max(len(run["tail"]), 1)}
    if core.teachers:  # which teachers were looked up in a cache rather than run
        out["cached_teachers"] = [core.caches[id(t)] is not None for t in core.teachers]
    ratios = run["ratios"]
    if ratios:
        end = [r for s, r in ratios if s >= 0.8 * steps] or [ratios[-1][1]]
        out.update(distill_ratio_start=ratios[0][1], distill_ratio_end=sum(end) / len(end))
    if log:
        log({"event": "trained", "desc": desc, "steps": steps, **out})
    return out


def fit(model, spec, path, loader, val_loader, steps, device, seed, recipe, teachers=(), *, desc, log=None,
        snapshots=None, mechanism="l2", inherit_first=False, extra=None):
    """What every training command does with a model: train it (train_loop; its resume state lives next
    to `path` until the end), evaluate it, save it to `path` with its metrics (and `extra`, e.g. the
    recipe), drop the resume state, log. Returns the metrics."""
    state = path[:-3] + ".state.pt"
    out = {"train_det_loss": float("nan")}
    if steps:
        out = train_loop(model, loader, steps, device, seed, recipe, teachers, desc=desc, log=log,
                         state=state, snapshots=snapshots, mechanism=mechanism, inherit_first=inherit_first)
    metrics = {**evaluate(model, val_loader, device, recipe["precision"]), **out, **(extra or {})}
    save_ckpt(path, model, spec, metrics)
    discard(state)
    if log:
        log({"event": "eval", "model": desc, **metrics})
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Evaluation: COCOeval on rank 0 over the detections of every rank.
# ---------------------------------------------------------------------------------------------------------
def evaluate(model, loader, device, precision="fp32", progress=False):
    """COCO metrics (data.score) of `model` on the loader's data, the forward under the precision's
    autocast (the boxes and scores are float32 all the same: models.py). Under torchrun every rank
    predicts its shard and rank 0 scores them all; every rank gets the metrics."""
    model.to(memory_format=memory_format(precision))
    try:
        part = data.predict(model, loader, loader.dataset.category_ids, device, progress, precision)
    finally:
        model.to(memory_format=torch.contiguous_format)
    if not distributed():
        return data.score(loader.dataset.coco, *part)
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
def float32(feats):
    """Levels in float32 (the cost matrix's features), keeping the images' sizes."""
    return mtpd.Levels({s: f.float() for s, f in feats.items()}, feats.sizes)


def cost_matrix(models, dataset, n_images, device, batch=8):
    """d(a -> b) for every ordered pair of frozen `models` ({label: model}); the first half of the first
    `n_images` training images (in file order, no augmentation) fits the linear maps, the second half is
    held out. One forward per model per batch, in float32. Under torchrun each rank takes every world-th
    image of each half and the ranks' statistics are summed (reduce_moments): every rank gets the
    matrix of all the images. The models are only read: each is evaluated in eval mode and left as it
    came (a student goes on to train: `distill`)."""
    n = min(n_images, len(dataset))
    if n < 2:
        fail(f"adaptation costs need at least 2 training images (one to fit, one held out), got {n}")
    r, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    halves = {"fit": range(n // 2)[r::world], "held": range(n // 2, n)[r::world]}
    for m in models.values():
        m.to(device)
    moments = {}
    with mtpd.eval_mode(*models.values()), torch.no_grad():
        for split, idx in halves.items():
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch,
                                                 collate_fn=data.collate)
            for images, _ in tqdm(loader, desc=f"cost ({split})", leave=False, disable=not is_main()):
                images = [im.to(device) for im in images]
                feats = {k: float32(fpn_features(m, images)) for k, m in models.items()}
                mtpd.accumulate_moments(moments, split, feats)
    return mtpd.costs_from_moments(reduce_moments(moments))


def reduce_moments(moments):
    """The sum over torchrun ranks of mtpd.accumulate_moments' statistics (each rank saw its own images);
    one process: unchanged. Keys can differ between ranks (images of other sizes), so the dicts are
    gathered and merged rather than all-reduced tensor by tensor."""
    if not distributed():
        return moments
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: dict(m, zz=m["zz"].cpu()) for k, m in moments.items()})
    total = {}
    for part in parts:
        for k, m in part.items():
            if k in total:
                total[k]["zz"] = total[k]["zz"] + m["zz"]
            else:
                total[k] = m
    return total


# ---------------------------------------------------------------------------------------------------------
# Checks and printouts shared by the subcommands.
# ---------------------------------------------------------------------------------------------------------
def teacher_order(cost, student, ap, k):
    try:
        return mtpd.backward_greedy_selection(cost, student, ap, k)
    except (KeyError, ValueError) as e:
        fail(f"cannot order the teachers: {e} (is every model in the cost file?)")


def check_writable(out):
    """Fail before any work if `out` cannot be created or written (checked without creating anything)."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        fail(f"cannot write the output {out}: {path} is not a writable folder; choose another --out")


def check_classes(student_spec, specs, root_cats=None):
    """Distillation pairs models of one label space (and the data's, when given)."""
    want = student_spec["category_ids"]
    for spec in specs:
        if spec["category_ids"] != want:
            fail(f"teacher {spec['label']} was trained on categories {spec['category_ids']}, the student on "
                 f"{want}: train the teachers on the student's data")
    if root_cats is not None and list(root_cats) != want:
        fail(f"the data has categories {list(root_cats)}, the student was trained on {want}; "
             "use the same data")


def check_labels(labels):
    """Costs, orders and stage files are keyed by label: every model of a command needs its own."""
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        fail(f"two models have the label '{dup[0]}': train them with different `train --label` names")
