"""Multi-Teacher Progressive Distillation (Cao et al., ICML 2023, arXiv 2308.09105), in the paper's order:

    1. feature capture   the neck (FPN) outputs of a detector, keyed by stride            (§3.1)
    2. adapter phi       identity / 1x1 conv / upsample / both, chosen from the shapes    (§3.1)
    3. feature loss      L = L_detect + lambda * || F_T - phi(F_S) ||^2                  (§3.1)
                         (divided by the teacher's feature variance in the batch: ours)
                         or CWD / FGD / MGD / PKD per level (mechanisms.py)               (§3.4)
    4. adaptation cost   d(A -> B): held-out error of the best linear 1x1 map A -> B      (§3.2)
                         (that map can also start a stage's adapter: ours, not the paper's)
    5. BGS               Backward Greedy Selection of the teacher order                   (§3.2, Alg. 1)
                         (and a forward-greedy order to compare it with: not the paper's)
    6. the schedule      one stage per teacher, fresh adapter and optimiser per stage     (§3.2)

It imports torch only: copy this file next to your own detector. Anything detector-specific (how to run a
model's backbone on a batch, how to train one stage) is passed in as a function. Give every model's
features the images' sizes before padding (Levels.sizes), or none: sizes on one side only are an error,
and without them levels of different sizes are resized as whole padded maps (warned once). With any
torchvision detector (test_mtpd.py runs this example, so it stays true):

    import torch, mtpd
    from torchvision.models.detection import retinanet_resnet50_fpn

    def features(model, images):  # FPN outputs {stride: [N, C, h, w]} and the images' sizes; no heads run
        batch, _ = model.transform(images)
        return mtpd.stride_keyed(batch.tensors.shape[-2:], model.backbone(batch.tensors), batch.image_sizes)

    kw = dict(weights=None, weights_backbone=None, num_classes=3, max_size=128)
    student = retinanet_resnet50_fpn(min_size=64, **kw)  # a low-resolution student: upsampling adapters
    teachers = {t: mtpd.freeze(retinanet_resnet50_fpn(min_size=128, **kw)) for t in "AB"}
    models = {"student": student, **teachers}
    images = [torch.rand(3, 128, 128) for _ in range(4)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])}] * 4
    with torch.no_grad():  # 4-5: costs on held-out images (first pair fits, second scores), then BGS
        student.eval()
        cost = mtpd.adaptation_costs((split, {k: features(m, images[i:i + 2]) for k, m in models.items()})
                                     for split, i in (("fit", 0), ("held", 2)))
    order = mtpd.backward_greedy_selection(cost, "student", {"A": 30.0, "B": 35.0}, k=2)  # teachers' AP
    feats, hook = mtpd.capture_features(student.backbone, student.transform)  # 1: its own forward fills feats
    for name in order:  # 6: one stage per teacher, with fresh adapters and a fresh optimiser
        adapters = mtpd.make_adapters(student, models[name], images, features)  # 2
        opt = torch.optim.AdamW([*student.parameters(), *adapters.parameters()], lr=1e-4)
        for step in range(2):  # 3: the detection losses plus lam * the feature loss
            losses = mtpd.distill_losses(student.train(), images, targets, feats, [models[name]], [adapters],
                                         features, lam=1.0)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
    hook.remove()  # the student is a plain detector again; the adapters are dropped
"""
import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------------
# 1. Feature capture (§3.1): distillation acts on the neck outputs F, level by level.
# ---------------------------------------------------------------------------------------------------------
class Levels(dict):
    """{stride: [N, C, h, w]}, plus `sizes`: each image's (h, w) in the model's input frame before the batch
    was padded (torchvision's ImageList.image_sizes), or None when unknown. The sizes let a level be
    aligned with another model's by the images' real extent, not by the padded maps (see align)."""

    def __init__(self, levels=(), sizes=None):
        super().__init__(levels)
        self.sizes = None if sizes is None else [tuple(int(v) for v in hw) for hw in sizes]


def stride_keyed(input_hw, feats, sizes=None):
    """Key a neck's levels by stride, so that levels of different detectors pair up correctly
    (RetinaNet: P3-P7 = strides 8..128; Mask R-CNN: P2-P6 = 4..64; pairing by list index would be wrong).

    input_hw: (H, W) of the padded input batch. feats: dict/list of [N, C, h, w], finest level first
    (a single map, e.g. a backbone without an FPN, is an error: wrap it as {'0': x}).
    sizes: each image's (h, w) before padding (ImageList.image_sizes), kept for alignment; without them
    the Levels carry none, and may only be compared with features that carry none either (see align).
    Returns Levels {stride: [N, C, h, w]}. The finest level's stride is H/h rounded to a power of two; each
    next level doubles it (FPN extra levels are stride-2 convs or pools: at tiny inputs P6 and P7 are both
    1x1, so their strides cannot be read from the sizes).
    """
    if isinstance(feats, torch.Tensor):  # iterating it would make one "level" per image of the batch
        raise TypeError(f"stride_keyed got one Tensor {list(feats.shape)}, not a neck's levels: pass the "
                        "dict/list of [N, C, h, w] levels the neck returns, or wrap a single map as {'0': x}")
    levels = list(feats.values() if isinstance(feats, dict) else feats)
    first = 2 ** round(math.log2(input_hw[0] / levels[0].shape[-2]))
    return Levels({first * 2 ** i: f for i, f in enumerate(levels)}, sizes)


def capture_features(backbone, transform=None):
    """Hook `backbone` so each forward also leaves its outputs, keyed by stride, in the returned Levels;
    with the detector's `transform` (torchvision's GeneralizedRCNNTransform) hooked too, the images'
    sizes before padding come along (store.sizes). Without a transform store.sizes stays None: the
    features compared with these must then carry no sizes either (feature_loss raises on sizes on one
    side only), and levels of different sizes are compared as whole padded maps (see align).

    The student's features come from its own training forward (the one that computes the detection
    losses): distillation costs no second student pass. Returns (store, hook handle); handle.remove()
    removes every hook.
    """
    store, sizes = Levels(), [None]

    def on_transform(module, inputs, output):
        sizes[0] = output[0].image_sizes

    def hook(module, inputs, output):
        store.clear()
        store.update(stride_keyed(inputs[0].shape[-2:], output))
        store.sizes = None if sizes[0] is None else [tuple(int(v) for v in hw) for hw in sizes[0]]

    handles = [backbone.register_forward_hook(hook)]
    if transform is not None:
        handles.append(transform.register_forward_hook(on_transform))
    return store, _Handles(handles)


class _Handles:
    """Several hook handles behind one remove()."""

    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def eval_mode(*models):
    """Run the block with `models` in eval mode, then give every submodule back the mode it had (also
    when the block raises): e.g. a forward that must not update a training student's BatchNorm."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# ---------------------------------------------------------------------------------------------------------
# 2. Adapter phi (§3.1): maps a student level to its teacher level. Training only, dropped at export.
# ---------------------------------------------------------------------------------------------------------
def content_cells(sizes, stride, hw):
    """Per image, the (rows, cols) of a level of stride `stride` and map size hw that cover its content:
    ceil(h / stride), ceil(w / stride), at most the map's. sizes: [(h, w)] before padding."""
    return [(min(math.ceil(h / stride), hw[0]), min(math.ceil(w / stride), hw[1])) for h, w in sizes]


_warned_padded = False  # the warning of _sizes_known fires once per process, not at every training step


def _sizes_known(sides, resized):
    """Whether the images' sizes can align the maps compared: sides {whose features: sizes or None}.
    True when every side carries sizes. Sizes on some sides only raise ValueError: ignoring them would
    resize the padded maps, the misalignment the caller gave sizes to avoid. False when no side carries
    any; then, if `resized` (the maps differ in size), whole padded maps are resized onto each other,
    which misaligns images of other sizes or aspect ratios: warned once per process."""
    global _warned_padded
    missing = [k for k, v in sides.items() if v is None]
    if not missing:
        return True
    if len(missing) < len(sides):
        have = [k for k in sides if k not in missing]
        raise ValueError(f"the features of {', '.join(missing)} carry no image sizes (Levels.sizes) but "
                         f"those of {', '.join(have)} do: give every side the sizes before padding, e.g. "
                         "capture_features(backbone, transform) with the detector's transform, or "
                         "stride_keyed(..., batch.image_sizes)")
    if resized and not _warned_padded:
        _warned_padded = True
        warnings.warn("mtpd: features without the images' sizes (Levels.sizes): levels of different sizes "
                      "are compared by resizing the whole padded maps, which misaligns images of different "
                      "sizes or aspect ratios; pass the sizes on every side (capture_features(backbone, "
                      "transform), stride_keyed(..., batch.image_sizes)). Warned once.", stacklevel=3)
    return False


def align(x, size, stride, student_sizes=None, teacher_sizes=None):
    """A student level x [N, C, h, w] resized onto a teacher level of `size` (H, W), image by image by
    the images' real extent: the cells covering each image's content in the student's frame go onto the
    cells covering it in the teacher's. Padding is not content: a batch is padded to its largest image
    (and to a multiple of 32), so two models at different input scales pad differently, and resizing
    the whole padded maps would stretch one image's content onto another's padding (a 640x480 image:
    student at 0.5x padded 416x544, teacher at 1x 800x1088: ~4 P3 cells off at the bottom).
    Returns (y [N, C, H, W], mask [N, 1, H, W] of the teacher's content cells, or None when every image
    fills both maps or neither side has sizes: then the whole map is resized, as for square images, with
    a warning (once) when the sizes differ). Sizes on one side only are a ValueError (_sizes_known)."""
    full = tuple(x.shape[-2:]), tuple(size)
    if not _sizes_known({"the student": student_sizes, "the teacher": teacher_sizes}, full[0] != full[1]):
        return _resize(x, size), None
    src, dst = content_cells(student_sizes, stride, full[0]), content_cells(teacher_sizes, stride, full[1])
    if all(a == full[0] for a in src) and all(b == full[1] for b in dst):
        return _resize(x, size), None
    ys, masks = [], []
    for i, ((hs, ws), (ht, wt)) in enumerate(zip(src, dst)):
        y = _resize(x[i:i + 1, :, :hs, :ws], (ht, wt))
        ys.append(F.pad(y, (0, size[1] - wt, 0, size[0] - ht)))  # zeros on the teacher's padding
        masks.append(F.pad(x.new_ones(1, 1, ht, wt), (0, size[1] - wt, 0, size[0] - ht)))
    return torch.cat(ys), torch.cat(masks)


def _resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class Adapter(nn.Module):
    """phi for one level: a 1x1 conv when the channels differ (or with conv=True), then bilinear resizing to
    the teacher's size when the resolutions differ (e.g. a low-resolution student), by the images' real
    extent when their sizes are given (align; both or neither). x [N, Cs, h, w] -> [N, Ct, H, W]."""

    def __init__(self, student_channels, teacher_channels, conv=False):
        super().__init__()
        self.channels = teacher_channels  # what it outputs
        self.proj = (nn.Conv2d(student_channels, teacher_channels, 1)
                     if conv or student_channels != teacher_channels else nn.Identity())

    def forward(self, x, size, stride=None, student_sizes=None, teacher_sizes=None):
        return align(self.proj(x), size, stride, student_sizes, teacher_sizes)[0]


def common_strides(student_feats, teacher_feats):
    """Strides present in both; a pair with none cannot be distilled."""
    strides = sorted(set(student_feats) & set(teacher_feats))
    if not strides:
        raise ValueError(f"no common FPN stride: student has {sorted(student_feats)}, "
                         f"teacher has {sorted(teacher_feats)}")
    return strides


def build_adapters(student_feats, teacher_feats, *, conv=False):
    """One fresh Adapter per common stride, from one batch of features. Returns nn.ModuleDict {str(stride)}.
    conv=True: a learned 1x1 conv even where the channel counts match (the paper's identity otherwise)."""
    return nn.ModuleDict({str(s): Adapter(student_feats[s].shape[1], teacher_feats[s].shape[1], conv)
                          for s in common_strides(student_feats, teacher_feats)})


@torch.no_grad()
def make_adapters(student, teacher, images, features, *, conv=False):
    """The adapters of one stage: build_adapters from one batch through both models. features(model,
    images) -> {stride: [N, C, h, w]} runs a model's backbone and neck. The student runs in eval mode here
    (eval_mode), so that this forward leaves its BatchNorm statistics alone. The adapters are trained with
    the student: put their parameters into the stage's optimiser."""
    with eval_mode(student):
        return build_adapters(features(student, images), features(teacher, images), conv=conv)


# ---------------------------------------------------------------------------------------------------------
# 3. Feature loss (§3.1): L2 between F_T and phi(F_S) over the common strides.
# ---------------------------------------------------------------------------------------------------------
def feature_loss(student_feats, teacher_feats, adapters, *, mechanisms=None, boxes=None, levels=None,
                 eps=1e-6):
    """sum_levels ||F_T - phi(F_S)||^2 / sum_levels (numel * Var(F_T)): the fraction of the teacher's total
    feature variance (over all common levels) that the student misses. 0 when F_S == F_T.

    Pooling over levels weights each level by its pixels, as the paper's plain L2 (a sum over pixels) and
    the adaptation cost do: P3 (most pixels) dominates, and a 1-cell P7 counts for 1/341 of a 5-level
    RetinaNet pyramid, not 1/5. The divisor is recomputed on every batch from F_T (detached: no gradient
    flows through it), so lambda / (sum_levels numel * Var(F_T)) acts as the paper's lambda (§3.1:
    L = L_detect + lambda * sum_levels ||F_T - phi(F_S)||^2): lambda = 1 makes the term the fraction of the
    teacher's variance the student misses (~1 for a student that outputs each level's mean of F_T, 0 when
    it matches), whatever the detector's raw feature scale. When both feature dicts carry the images' sizes
    (Levels.sizes), each image is aligned by its real extent and the teacher's padding is left out of the
    error and of the variance (align); sizes on one side only are a ValueError, none on either side resize
    the padded maps (warned once).
    A mechanism receives both maps with F_T's values on the teacher's padding (not masked: its loss may
    still see those cells, e.g. MGD's 3x3 generator or CWD's softmax over positions).

    mechanisms: another loss per level in place of the L2 (§3.4: MTPD wraps CWD, FGD, MGD, PKD), an
    nn.ModuleDict keyed like `adapters` of modules m(phi(F_S), F_T, boxes, stride) -> scalar; their sum
    over levels is returned, as their authors do. boxes: the ground truth in the teacher's input frame
    (list of [n_i, 4] xyxy), for the mechanisms that need it (FGD).
    levels: a dict that, when given, receives each level's share of the returned loss (detached floats
    are read by the caller only when it logs), keyed by stride; the shares sum to the loss.
    """
    errors, scales = [], []
    ssz, tsz = getattr(student_feats, "sizes", None), getattr(teacher_feats, "sizes", None)
    for key, adapter in adapters.items():
        s = int(key)
        # float32 even under bf16 autocast: a squared difference divided by a variance needs the mantissa
        ft = teacher_feats[s].detach().float()  # [N, Ct, H, W]
        fs, mask = align(adapter.proj(student_feats[s]), ft.shape[-2:], s, ssz, tsz)  # [N, Ct, H, W]
        fs = fs.float()
        if mask is not None:  # the teacher's padding is not compared: there fs takes F_T's values
            mask = mask.float()
            fs = fs + ft * (1 - mask)
        if mechanisms is not None:
            errors.append(mechanisms[key](fs, ft, boxes, s))
            scales.append(None)
        else:
            errors.append((fs - ft).pow(2).sum())  # this level's squared error, summed over pixels
            if mask is None:
                scales.append(ft.numel() * ft.var())  # and the teacher's total variance there
            else:  # over the content cells only
                n = mask.sum() * ft.shape[1]
                mean = (ft * mask).sum() / n
                scales.append(n * ((ft - mean).pow(2) * mask).sum() / (n - 1).clamp(min=1))
    if mechanisms is None:
        total_var = torch.stack(scales).sum() + eps
        errors = [e / total_var for e in errors]
    if levels is not None:
        for key, e in zip(adapters, errors):
            levels[int(key)] = levels.get(int(key), 0.0) + e.detach()
    return torch.stack(errors).sum()


def distill_losses(student, images, targets, student_feats, teachers, adapters, teacher_features, *, lam=1.0,
                   mechanisms=None, teacher_boxes=None, levels=None):
    """One training forward of §3.1: L = L_detect + lam * sum over teachers of the feature loss.

    student: a detector in train mode returning a dict of detection losses, whose backbone is hooked by
    `capture_features` (student_feats). teachers: frozen detectors (one for a progressive stage, several for
    the ensemble baseline), each with its nn.ModuleDict of adapters. teacher_features(teacher, images)
    -> {stride: [N, C, H, W]} runs only the teacher's backbone+neck: its heads never run.
    mechanisms: None (the L2), or one ModuleDict per teacher (see feature_loss); teacher_boxes(teacher,
    images, targets) -> the targets' boxes in that teacher's input frame, for mechanisms that use boxes.
    levels: a dict that receives the feature loss of each stride, summed over teachers (before lam).
    Returns the loss dict: the detection terms plus 'distill' (already multiplied by lam).
    """
    losses = student(images, targets)  # fills student_feats through the hook
    if teachers:
        total = 0.0
        for i, (teacher, adapter) in enumerate(zip(teachers, adapters)):
            with torch.no_grad():  # there is no backpropagation through the teacher
                ft = teacher_features(teacher, images)
                boxes = teacher_boxes(teacher, images, targets) if teacher_boxes else None
            mech = mechanisms[i] if mechanisms is not None else None
            total = total + feature_loss(student_feats, ft, adapter, mechanisms=mech, boxes=boxes,
                                         levels=levels)
        losses["distill"] = lam * total
    return losses


def freeze(model):
    """A teacher: eval mode, no gradients, never in an optimiser (§3.1)."""
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------
# 4. Adaptation cost (§3.2): d(A -> B) = held-out L2 of the best linear 1x1 map from A's features to B's.
# ---------------------------------------------------------------------------------------------------------
def _rows(x):
    """[N, C, H, W] -> [N*H*W, C] in float64 (a 1x1 conv is a per-pixel linear map of channels)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()


def accumulate_moments(moments, split, feats):
    """Add one batch to the sufficient statistics of every ordered pair of models, at every stride.

    split: 'fit' or 'held'. feats: {model_name: {stride: [N, C, H, W]}}, one forward of each model on the
    same images. A pair (a, b) compares A's level, resized to B's size (bilinear: still linear), with B's.
    So for each stride s and each size (h, w) of some model's level s, every model's level is resized to
    (h, w) and laid side by side with a column of ones: Z = [X_1 | ... | X_M | 1]  [N*h*w, sum C + 1].
    Its one Gram matrix Z'Z [sum C + 1, sum C + 1] holds X'X, X'Y and the sums of Y for every pair whose
    target has that size: one matrix product per level instead of one per pair. Stays on the features'
    device, in float64. moments[(split, s, native)] = {"names", "channels", "native", "zz"}, summed over
    batches and sizes. When the features carry the images' sizes (Levels.sizes) and a model's images leave
    padding, each image's content is cropped and compared on its own: padding is not a feature. Sizes on
    some models only are a ValueError; on none, levels of different sizes are whole padded maps resized
    (warned once; see _content).
    """
    for s in sorted({s for f in feats.values() for s in f}):
        names = [k for k in feats if s in feats[k]]
        if len(names) < 2:
            continue
        for part in _content(feats, names, s):  # the whole batch, or image by image (padding left out)
            for size in dict.fromkeys(tuple(f.shape[-2:]) for f in part):
                cols = [_resize(f.float(), size) for f in part]
                z = torch.cat([_rows(c) for c in cols], 1)  # [P, sum C]
                z = torch.cat([z, torch.ones_like(z[:, :1])], 1)  # [P, sum C + 1]: the bias column last
                native = tuple(tuple(f.shape[-2:]) == size for f in part)  # which are targets here
                m = moments.setdefault((split, s, native), {
                    "names": names, "channels": [c.shape[1] for c in cols], "native": native, "zz": 0.0})
                m["zz"] = m["zz"] + z.T @ z
    return moments


def _content(feats, names, s):
    """The maps of level s of `names`, as one batch when no model's images leave padding at that level
    (or no model has sizes); else, image by image, each model's map cropped to the image's content.
    Sizes on some models only raise ValueError (_sizes_known)."""
    maps = [feats[k][s] for k in names]
    sizes = [getattr(feats[k], "sizes", None) for k in names]
    resized = len({tuple(f.shape[-2:]) for f in maps}) > 1
    if not _sizes_known({repr(k): z for k, z in zip(names, sizes)}, resized):
        return [maps]
    cells = [content_cells(z, s, f.shape[-2:]) for z, f in zip(sizes, maps)]
    if all(c == tuple(f.shape[-2:]) for cs, f in zip(cells, maps) for c in cs):
        return [maps]
    return [[f[i:i + 1, :, :cs[i][0], :cs[i][1]] for f, cs in zip(maps, cells)] for i in range(len(maps[0]))]


def _pair_stats(moments):
    """Per (split, a, b, stride): [X'X, X'Y, sum Y, sum Y^2, rows] read off the Gram blocks, summed over
    sizes (batches of different image sizes give levels of different sizes)."""
    stats = {}
    for (split, s, _), m in moments.items():
        zz, last = m["zz"], m["zz"].shape[0] - 1
        ends = torch.tensor(m["channels"]).cumsum(0).tolist()
        cols = {k: slice(e - c, e) for k, c, e in zip(m["names"], m["channels"], ends)}
        for b, native in zip(m["names"], m["native"]):
            if not native:  # its own-size group holds b as a target
                continue
            yb = cols[b]
            for a in m["names"]:
                if a == b:
                    continue
                xa = list(range(zz.shape[0]))[cols[a]] + [last]  # A's channels and the bias
                new = [zz[xa][:, xa], zz[xa, yb], zz[last, yb], zz[yb, yb].trace(), zz[last, last]]
                old = stats.get((split, a, b, s))
                stats[(split, a, b, s)] = new if old is None else [u + v for u, v in zip(old, new)]
    return stats


def _ridge_solve(xx, xy, ridge):
    """W = (X'X + r I)^-1 X'Y, r = ridge * mean(diag X'X), the bias (last row) not penalised. [Ca+1, Cb]"""
    reg = torch.eye(xx.shape[0], dtype=xx.dtype, device=xx.device) * ridge * xx.diagonal()[:-1].mean()
    reg[-1, -1] = 0.0
    return torch.linalg.solve(xx + reg, xy)


def costs_from_moments(moments, *, ridge=1e-2):
    """Solve each pair's ridge least squares on 'fit', evaluate it exactly on 'held'.

    W = (X'X + r I)^-1 X'Y  with r = ridge * mean(diag X'X) (bias not penalised);
    held SSE = sum Y^2 - 2 <W, X'Y> + <W, X'X W>;  SST = sum Y^2 - |sum Y|^2 / n  (per level).
    cost(a->b) = sum of SSE / sum of SST over the common levels: the fraction of B's held-out feature
    variance that no linear map of A explains (0 = B holds nothing A lacks). Pooling over levels weights
    them by pixels, so the coarse levels (a few pixels, easy to overfit) cannot dominate. Dividing by B's
    variance changes no BGS decision, since BGS only compares costs into the same target. -> {a: {b: float}}
    """
    stats, sums = _pair_stats(moments), {}
    for (split, a, b, s), (xx, xy, _, _, _) in stats.items():
        if split != "fit":
            continue
        if ("held", a, b, s) not in stats:
            raise ValueError("the held-out split is empty: adaptation costs need held-out features")
        w = _ridge_solve(xx, xy, ridge)  # [Ca+1, Cb]
        hxx, hxy, hsy, hyy, n = stats[("held", a, b, s)]
        sse = hyy - 2 * (w * hxy).sum() + (w * (hxx @ w)).sum()
        sst = hyy - (hsy * hsy).sum() / n
        acc = sums.setdefault(a, {}).setdefault(b, [0.0, 0.0])
        acc[0] += float(sse.clamp(min=0))
        acc[1] += float(sst)
    return {a: {b: e / max(t, 1e-12) for b, (e, t) in row.items()} for a, row in sums.items()}


def adaptation_costs(batches, *, ridge=1e-2):
    """The whole cost matrix from one pass: batches yields (split, {model: {stride: features}}).
    Each model runs once per batch, so N models cost N forward passes over the data (no SGD)."""
    moments = {}
    for split, feats in batches:
        accumulate_moments(moments, split, feats)
    return costs_from_moments(moments, ridge=ridge)


def least_squares_adapters(adapters, moments, student, teacher, *, ridge=1e-2):
    """Start each 1x1-conv adapter (build_adapters(..., conv=True)) at the map the adaptation cost fits
    from `student`'s level to `teacher`'s: the same ridge solve over all of `moments` (accumulate_moments
    of both models' features, any split). Not in the paper, whose adapters start at random: an adapter
    that starts at the best linear map absorbs the change of channel basis from one independently trained
    teacher to the next, so a stage's feature loss starts at the cost d(student -> teacher) (a fraction of
    the teacher's variance) instead of at a full rotation of the student's FPN onto the teacher's basis.
    W [Cs+1, Ct] -> proj.weight [Ct, Cs, 1, 1] and proj.bias [Ct]. Returns the adapters."""
    stats = {}
    for (split, a, b, s), st in _pair_stats(moments).items():
        if (a, b) == (student, teacher):
            old = stats.get(s)
            stats[s] = st[:2] if old is None else [u + v for u, v in zip(old, st[:2])]
    for key, adapter in adapters.items():
        if int(key) not in stats or not isinstance(adapter.proj, nn.Conv2d):
            raise ValueError(f"no least-squares fit for the adapter at stride {key}: it needs a 1x1 conv "
                             f"and both models' features at that stride")
        w = _ridge_solve(*stats[int(key)], ridge)
        with torch.no_grad():
            adapter.proj.weight.copy_(w[:-1].T.reshape(adapter.proj.weight.shape))
            adapter.proj.bias.copy_(w[-1])
    return adapters


# ---------------------------------------------------------------------------------------------------------
# 5. Backward Greedy Selection (§3.2, Algorithm 1).
# ---------------------------------------------------------------------------------------------------------
def backward_greedy_selection(cost, student, teacher_ap, k):
    """Choose the teacher order, first stage first.

    cost[a][b] = d(a -> b); student: a key of cost; teacher_ap: {teacher: validation AP} (the candidates);
    k: the most teachers to use. The last teacher is the best one; then, repeatedly, the remaining teacher
    with the smallest cost into the current first teacher is prepended, until every remaining teacher costs
    more than the student itself into it (the student is already closer than any bridge) or k is reached.
    Built backwards because later teachers shape the final student most.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    order = [max(teacher_ap, key=lambda t: (teacher_ap[t], t))]
    remaining = set(teacher_ap) - set(order)
    while remaining and len(order) < k:
        first = order[0]
        bridge = min(sorted(remaining), key=lambda t: cost[t][first])
        if cost[bridge][first] > cost[student][first]:
            break  # every remaining teacher is farther from `first` than the student is
        order.insert(0, bridge)
        remaining.remove(bridge)
    return order


def forward_greedy_selection(cost, student, teacher_ap, k):
    """The forward counterpart of BGS (a later paper, TGRD, plans its teacher sequence forwards; not MTPD's):
    from the student, repeatedly take the cheapest next teacher, the one with the smallest d(current -> t)
    among the remaining teachers stronger than the current one (the student counts as weaker than every
    teacher), until the best teacher is taken or one place of k is left, which then goes to the best
    teacher. Like BGS the order ends with the best teacher; unlike BGS it starts near the student, so it
    never stops early. Returns the order, first stage first. cost, student, teacher_ap, k: as BGS's."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    best = max(teacher_ap, key=lambda t: (teacher_ap[t], t))
    order, current = [], student
    while len(order) < k - 1:
        stronger = sorted(t for t in teacher_ap if t not in order and  # the best is always ahead (ties)
                          (current == student or t == best or teacher_ap[t] > teacher_ap[current]))
        current = min(stronger, key=lambda t: cost[current][t])
        order.append(current)
        if current == best:
            return order
    return order + [best]


# ---------------------------------------------------------------------------------------------------------
# 6. Progressive distillation (§3.2): one stage per teacher, in the BGS order.
# ---------------------------------------------------------------------------------------------------------
def progressive_distillation(student, teachers, run_stage):
    """Distil `student` from each teacher in turn (§3.2). run_stage(student, teacher, i) trains stage i
    (a "1x" schedule in the paper) from the student the previous stage left, with a fresh adapter and a
    fresh optimiser and LR schedule, and returns (the student it leaves, what it measured). The student
    can be a module trained in place or anything that names one (e.g. a checkpoint path).
    Returns (the last student, [what each stage measured])."""
    results = []
    for i, teacher in enumerate(teachers):
        student, result = run_stage(student, teacher, i)
        results.append(result)
    return student, results
