"""How a model trains and is scored, in one process or under torchrun: precision by hardware, checkpoints,
the batches, one stage's training loop (resumable, SIGTERM-safe), the teacher-feature cache, evaluation and
the cost matrix. Plain functions: the configuration stays in train.py."""
import datetime
import functools
import json
import math
import os
import signal
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import mechanisms
import mtpd
from data import fail
from models import autocast, build_detector, fpn_features, inherit


# Distributed: under `torchrun` every rank runs this code (RANK, LOCAL_RANK set); else one process. -------
def init_distributed(device):
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" in os.environ and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return torch.device("cuda", local) if device == "cuda" else torch.device("cpu")


def distributed():
    return dist.is_available() and dist.is_initialized()


def is_main():
    return not distributed() or dist.get_rank() == 0


def barrier():
    if distributed():
        dist.barrier()


def from_main(obj):  # rank 0's `obj` on every rank (metrics, costs: the ranks agree on the order)
    box = [obj]
    if distributed():
        dist.broadcast_object_list(box, 0)
    return box[0]


# Precision by hardware: low precision only where the device computes it natively. ------------------------
def choose_precision(device, asked="auto"):
    """(precision, why): 'bf16' (autocast), 'fp16' (autocast and a GradScaler) or 'fp32'. auto: bf16 where
    the device has it natively (a GPU from Ampere on; a CPU whose oneDNN reports AVX-512 BF16 or AMX),
    fp16 on an older GPU with tensor cores, else float32 (an AVX2 CPU emulates bf16, several times slower)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        what = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
        native = {"bf16": major >= 8, "fp16": major >= 7}
    else:
        what = f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
        native = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(), "fp16": False}
    if asked != "auto":
        slow = "" if asked == "fp32" or native[asked] else f"; {what} emulates it, several times slower"
        return asked, f"{asked}, as asked (--precision {asked}){slow}"
    if native["bf16"]:
        return "bf16", f"bf16 autocast: {what} computes bfloat16 natively (--precision fp32 for float32)"
    if device.type == "cuda" and native["fp16"]:
        return "fp16", f"fp16 autocast with a GradScaler: {what} has fp16 but no bf16 tensor cores"
    return "fp32", f"float32: {what} has no native bfloat16, where bf16 runs several times slower"


def memory_format(precision):  # channels_last under autocast (in float32 on a CPU it was slower)
    return torch.preserve_format if precision == "fp32" else torch.channels_last


# Checkpoints: {model, spec, metrics}; the spec (build_detector's arguments) rebuilds the model alone. ----
def make_spec(label, name, scale, size, cats, max_size=None, anchor_base=None, **kw):  # cats: category ids
    return dict(label=label, name=name, num_classes=len(cats) + 1, scale=scale, min_size=size,
                max_size=max_size or size, anchor_base=anchor_base or size // 8,
                category_ids=list(cats), **kw)


def build(spec, seed=None):
    if seed is not None:
        torch.manual_seed(seed)  # fixes the random initialisation
    return build_detector(**{k: v for k, v in spec.items() if k not in ("label", "category_ids")})


def save(path, obj):  # atomically, on rank 0 (JSON for a .json path); every rank waits
    if is_main() and path.endswith(".json"):
        data.atomic_write(path, lambda f: json.dump(obj, f, indent=1))
    elif is_main():
        data.atomic_write(path, lambda f: torch.save(obj, f), mode="wb")
    barrier()


def save_ckpt(path, model, spec, metrics):
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}  # whatever the memory format
    save(path, dict(model=weights, spec=spec, metrics=metrics))


def read(path):
    """torch.load(weights_only=True): tensors and plain values only, a file with pickled code is refused."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e):  # what weights_only refuses
            fail(f"refused to load {path}: it holds pickled Python objects, which can run code; mtpd files "
                 "hold tensors and plain values only (re-save just the state_dict)")
        fail(f"cannot read checkpoint {path} (corrupt or truncated?): {str(e).splitlines()[0][:160]}")


def load(path, device="cpu"):
    """A checkpoint -> (model, spec, metrics); model.source identifies the file (the feature cache)."""
    ck = read(path)
    if not isinstance(ck, dict) or "spec" not in ck or "model" not in ck:
        fail(f"{path} is not an mtpd checkpoint (no spec/model); an exported student.pt is a plain "
             "state_dict: engine.build(spec from student_spec.json).load_state_dict(...)")
    try:
        model = build(ck["spec"])
        model.load_state_dict(ck["model"])
    except Exception as e:
        fail(f"checkpoint {path} does not match its spec {ck['spec'].get('name')}: "
             f"{' '.join(str(e).split())[:200]}")
    st = os.stat(path)
    model.source = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    return model.to(device), ck["spec"], ck.get("metrics", {})


# Batches: endless, each a pure function of (seed, iteration), so a resumed run sees the same ones. -------
class Batches(torch.utils.data.Sampler):
    """Pass e over this rank's shard (every world-th image) is a permutation seeded by (seed, e)."""

    def __init__(self, n, batch, seed=0, start=0):
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed() else (1, 0)
        self.shard, self.batch, self.seed, self.start = torch.arange(rank, n, world), batch, seed, start
        self.per_pass = max(1, len(self.shard) // batch)

    def __iter__(self):
        step = self.start
        while True:
            epoch, i = divmod(step, self.per_pass)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            mine = self.shard[torch.randperm(len(self.shard), generator=g)]
            yield mine[i * self.batch:(i + 1) * self.batch].tolist()
            step += 1


@functools.lru_cache(maxsize=4)  # a dataset is read once per process (COCO's annotations take a minute)
def loaders(root, batch, seed, masks, device, workers=0):
    """(the endless training loader, flipped at random; the validation loader)."""
    train = data.CocoDetection(root, "train", flip=True, masks=masks)
    val = data.CocoDetection(root, "val", masks=False)
    if not len(train) or not len(val):
        fail(f"{root} has an empty split ({len(train)} train, {len(val)} val images); both need images")
    kw = dict(collate_fn=data.collate, num_workers=workers, pin_memory=device.type == "cuda",
              persistent_workers=workers > 0)
    # its own generator: a loader's iterator draws its worker seed there, not from the RNG of the flips
    return (torch.utils.data.DataLoader(train, batch_sampler=Batches(len(train), batch, seed),
                                        generator=torch.Generator().manual_seed(seed), **kw),
            torch.utils.data.DataLoader(val, batch, **kw))


# The teacher-feature cache: a frozen teacher's features of an (image, flip) never change, so on data whose
# only augmentation is the flip and whose images share one size (else an image's map depends on the padding
# of its batch) each is computed once, and looked up by every later step, stage and row that uses the teacher.
_caches = {}  # (teacher's file, data, device, precision) -> {(image_id, flipped): ({stride: map}, size)}


def teacher_features(teacher, images, targets, precision, cache=None, limit=2 * 2 ** 30):
    """The teacher's Levels of a batch: from `cache`, or a forward whose maps join it (up to `limit`)."""
    keys = [(t["image_id"], t["flipped"]) for t in targets]
    if cache is not None and all(k in cache for k in keys):
        return mtpd.Levels({s: torch.stack([cache[k][0][s] for k in keys]) for s in cache[keys[0]][0]},
                           [cache[k][1] for k in keys])
    with autocast(images[0].device, precision):
        feats = fpn_features(teacher, images)
    for i, k in enumerate(keys if cache is not None else []):
        if k not in cache and cache.get("bytes", 0) < limit:  # one image's maps, copied out of the batch
            cache[k] = ({s: f[i].clone() for s, f in feats.items()}, feats.sizes[i])
            cache["bytes"] = cache.get("bytes", 0) + sum(m.nbytes for m in cache[k][0].values())
    return feats


# Training: one loop for a plain run, a progressive stage (one teacher) and the ensemble (several). -------
def lr_at(step, steps, recipe):  # linear warm-up, constant, x drop from drop_at on (early decay hurt)
    if step < recipe["warmup"]:
        return (step + 1) / recipe["warmup"]
    return recipe["drop"] if step >= recipe["drop_at"] * steps else 1.0


def setup(model, loader, steps, device, seed, recipe, teachers=(), mechanism="l2", inherit_first=False,
          desc="train"):
    """A stage's setup, in the order that fixes its random numbers: inheriting, fresh adapters and mechanism
    modules (§3.1, §3.4), a fresh AdamW and LR schedule (§3.2), the hooked features. -> a namespace."""
    torch.manual_seed(seed + (dist.get_rank() if distributed() else 0))  # augmentation differs per rank
    loader.batch_sampler.seed, loader.batch_sampler.start = seed, 0
    fmt = memory_format(recipe["precision"])
    model.__dict__.pop("source", None)  # its weights will differ from the file's
    model.to(device, memory_format=fmt).train()
    teachers = [mtpd.freeze(t.to(device, memory_format=fmt)) for t in teachers]
    adapters, mechs = torch.nn.ModuleList(), torch.nn.ModuleList()  # one ModuleDict per teacher in each
    if teachers:
        first = [im.to(device) for im in next(iter(loader))[0]]
        try:
            if inherit_first:
                copied, of = inherit(model, teachers[0], first)
                print(f"{desc}: inherited {copied} of the student's {of} neck and head tensors from the "
                      "first teacher")
            adapters.extend(mtpd.make_adapters(model, t, first, fpn_features) for t in teachers)
        except ValueError as e:  # no common stride, nothing to inherit
            fail(f"cannot distil {desc}: {e}")
        if mechanism != "l2":
            mechs.extend(torch.nn.ModuleDict({k: mechanisms.make(mechanism, a[k].channels) for k in a})
                         for a in adapters)
    extra = torch.nn.ModuleList([adapters, mechs]).to(device, memory_format=fmt)
    for t in extra.state_dict().values() if distributed() else []:  # every rank starts from rank 0's
        dist.broadcast(t, 0)
    params = [p for p in [*model.parameters(), *extra.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"], fused=True)
    ds, where = loader.dataset, (str(device), recipe["precision"])
    feats, hooks = mtpd.capture_features(model.backbone, model.transform) if teachers else (None, None)
    return SimpleNamespace(
        model=model, student=torch.nn.parallel.DistributedDataParallel(model) if distributed() else model,
        teachers=teachers, adapters=list(adapters), extra=extra, params=params, opt=opt, feats=feats,
        hooks=hooks, sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps, recipe)),
        mechs=list(mechs) if mechanism != "l2" else None, run={"step": 0, "distill_share_start": None},
        caches={id(t): _caches.setdefault((t.source, ds.root, ds.split, *where), {})  # by teacher, once
                if hasattr(t, "source") and ds.one_size() else None for t in teachers},
        boxes=mechanisms.input_boxes if mechanism == "fgd" else None,
        scaler=torch.amp.GradScaler(device.type) if recipe["precision"] == "fp16" else None)


def train(model, loader, steps, device, seed, recipe, teachers=(), *, state=None, log=None, desc="train",
          mechanism="l2", inherit_first=False):
    """Train `model` `steps` iterations; with teachers, L = L_detect + lam * the feature loss (§3.1, §3.4).
    recipe: train.RECIPE with lr, precision, lam, normalize, resume, made. The whole state goes to `state`
    every ckpt_every iterations and at SIGTERM / SIGUSR1 (then exiting); resume continues it exactly."""
    st = setup(model, loader, steps, device, seed, recipe, teachers, mechanism, inherit_first, desc)
    if recipe["resume"] and state and os.path.isfile(state):
        ck = read(state)
        if ck.get("made") != recipe.get("made"):
            fail(f"{state} was started otherwise ({ck.get('made')}; now {recipe.get('made')}): resume it "
                 "with the same flags, or delete it to start again")
        for obj, key in ((model, "model"), (st.extra, "extra"), (st.opt, "optimizer"),
                         (st.sched, "scheduler"), (st.scaler, "scaler")):
            if obj is not None:
                obj.load_state_dict(ck[key])
        torch.set_rng_state(ck["rng"][dist.get_rank() if distributed() else 0])
        st.run = ck["run"]
        print(f"{desc}: resumed at iteration {st.run['step']} of {steps} from {state}")
    loader.batch_sampler.start = st.run["step"]
    stop, batches = [], iter(loader)
    handlers = {s: signal.signal(s, lambda n, _: stop.append(n)) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for i in tqdm(range(st.run["step"], steps), desc=desc, leave=False, disable=not is_main(),
                      initial=st.run["step"], total=steps, mininterval=1.0):
            images, targets = next(batches)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
            losses, levels = step(st, images, targets, recipe)
            if i % 10 == 0 or i == steps - 1:  # reading values syncs with the device: only now and then
                log_losses(losses, levels, i, st.run, desc, log, recipe["lam"])
            if distributed():  # every rank stops after the same iteration
                flag = torch.tensor(float(bool(stop)), device=device)
                dist.all_reduce(flag)
                stop += [signal.SIGTERM] if flag.item() and not stop else []
            if state and (stop or (i + 1) % recipe["ckpt_every"] == 0):
                st.run["step"] = i + 1
                save_state(state, st, desc, recipe.get("made"))
            if stop:
                print(f"{desc}: stopped by signal {stop[0]} after iteration {i + 1}; its state is in "
                      f"{state}: run the same command with --resume to continue", flush=True)
                raise SystemExit(128 + stop[0])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if st.hooks:
            st.hooks.remove()
    if distributed():  # each rank's last forward left its own BatchNorm statistics: keep rank 0's
        for b in model.buffers():
            dist.broadcast(b, 0)
    return {"distill_share_start": st.run["distill_share_start"]}


def step(st, images, targets, recipe):
    """One step under the precision's autocast, clipped. -> (losses, the feature loss per stride)."""
    levels = {}
    with autocast(images[0].device, recipe["precision"]):
        if st.teachers:
            losses = mtpd.distill_losses(
                st.student, images, targets, st.feats, st.teachers, st.adapters,
                lambda t, ims: teacher_features(t, ims, targets, recipe["precision"], st.caches[id(t)]),
                lam=recipe["lam"], normalize=recipe["normalize"], mechanisms=st.mechs,
                teacher_boxes=st.boxes, levels=levels)
        else:
            losses = st.student(images, targets)
    st.opt.zero_grad(set_to_none=True)
    loss = sum(losses.values())
    (st.scaler.scale(loss) if st.scaler else loss).backward()
    if distributed():  # DDP averages the student's gradients; the adapters' are averaged here
        for p in st.extra.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
    if st.scaler:
        st.scaler.unscale_(st.opt)  # clip the true gradients
    torch.nn.utils.clip_grad_norm_(st.params, recipe["clip"])
    if st.scaler:
        st.scaler.step(st.opt)
        st.scaler.update()
    else:
        st.opt.step()
    st.sched.step()
    return losses, levels


def log_losses(losses, levels, i, run, desc, log, lam):
    """Stop on a non-finite loss; log the terms and the feature loss per stride (after lam)."""
    vals = {k: v.item() for k, v in losses.items()}
    if not all(math.isfinite(v) for v in vals.values()):
        fail(f"non-finite loss at iteration {i} of {desc}: {vals}; stopped (try a lower --lr)")
    if "distill" in vals and run["distill_share_start"] is None:  # the feature term's share at the start
        run["distill_share_start"] = vals["distill"] / sum(vals.values())
    if log:
        log({"event": "step", "desc": desc, "step": i, **vals,
             "distill_levels": {str(s): lam * float(v) for s, v in levels.items()}})


def save_state(path, st, desc, made):
    """The whole state, every rank's RNG included; never non-finite weights over a good state."""
    if not all(bool(torch.isfinite(p).all()) for p in st.params):
        fail(f"non-finite weights after iteration {st.run['step'] - 1} of {desc}; stopped, {path} is kept")
    rng = [torch.get_rng_state()] * (dist.get_world_size() if distributed() else 1)
    if distributed():
        dist.all_gather_object(rng, torch.get_rng_state())
    save(path, dict(model=st.model.state_dict(), extra=st.extra.state_dict(), rng=rng, run=st.run, made=made,
                    optimizer=st.opt.state_dict(), scheduler=st.sched.state_dict(),
                    scaler=st.scaler.state_dict() if st.scaler else {}))


# Evaluation and the cost matrix: on rank 0, the result shared with every rank. ----------------------------
def evaluate(model, loader, device, precision="fp32"):
    """COCO metrics of `model` on the loader's data (rank 0), under the precision's autocast."""
    metrics = None
    if is_main():
        model.to(memory_format=memory_format(precision))
        bbox, segm = data.predict(model, loader, loader.dataset.category_ids, device, precision)
        model.to(memory_format=torch.contiguous_format)
        metrics = data.score(loader.dataset.coco, bbox, segm)
    return from_main(metrics)


@torch.no_grad()
def cost_matrix(models, dataset, n_images, device, batch=8):
    """d(a -> b) for every ordered pair of `models` {label: model} (§3.2): the first half of n_images
    training images fits the maps, the second scores them; float32, on rank 0; the modes left as they were."""
    n = min(n_images, len(dataset))
    if n < 2:
        fail(f"adaptation costs need at least 2 training images (one to fit, one held out), got {n}")
    cost = None
    for m in models.values():
        m.to(device)
    if is_main():
        def batches():
            for split, idx in (("fit", range(n // 2)), ("held", range(n // 2, n))):
                for j in tqdm(range(idx.start, idx.stop, batch), desc=f"cost ({split})", leave=False):
                    images = [dataset[i][0].to(device) for i in range(j, min(j + batch, idx.stop))]
                    yield split, {k: fpn_features(m, images) for k, m in models.items()}

        with mtpd.eval_mode(*models.values()):
            cost = mtpd.adaptation_costs(batches())
    return from_main(cost)
