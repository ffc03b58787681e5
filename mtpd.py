"""Multi-Teacher Progressive Distillation (Cao et al., ICML 2023, arXiv 2308.09105), in the paper's order:

    1. feature capture   a detector's neck (FPN) outputs, keyed by stride              (§3.1)
    2. adapter phi       identity / 1x1 conv / resize / both, chosen from the shapes   (§3.1)
    3. feature loss      L = L_detect + lam * ||F_T - phi(F_S)||^2                     (§3.1, §3.4)
    4. adaptation cost   d(A -> B): held-out error of the best linear 1x1 map A -> B   (§3.2)
    5. BGS               Backward Greedy Selection of the teacher order                (§3.2, Alg. 1)
    6. the schedule      one stage per teacher, fresh adapters and optimiser: a loop   (§3.2)

It imports torch only: copy it next to your detector. The loss and the cost share one normalisation (the
teacher's variance, each channel about its own mean), so lam = 1 weighs the fraction of the teacher's
variance the student misses; normalize=False gives the paper's plain mean squared error. Both examples
below run in test_mtpd.py. With torchvision's detectors:

    import torch, mtpd
    from torchvision.models.detection import retinanet_resnet50_fpn

    def features(model, images):  # {stride: [N, C, h, w]} of the neck, with the sizes before padding
        batch, _ = model.transform(images)
        return mtpd.stride_keyed(batch.tensors.shape[-2:], model.backbone(batch.tensors), batch.image_sizes)

    kw = dict(weights=None, weights_backbone=None, num_classes=3, max_size=128)
    student = retinanet_resnet50_fpn(min_size=64, **kw)  # a low-resolution student: resizing adapters
    teachers = {t: mtpd.freeze(retinanet_resnet50_fpn(min_size=128, **kw)) for t in "AB"}
    models = {"student": student, **teachers}
    images = [torch.rand(3, 128, 128) for _ in range(4)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])}] * 4
    with torch.no_grad(), mtpd.eval_mode(student):  # 4-5: costs (images 0-1 fit, 2-3 score), then BGS
        cost = mtpd.adaptation_costs((split, {k: features(m, images[i:i + 2]) for k, m in models.items()})
                                     for split, i in (("fit", 0), ("held", 2)))
    order = mtpd.backward_greedy_selection(cost, "student", {"A": 30.0, "B": 35.0}, k=2)  # teachers' AP
    feats, hooks = mtpd.capture_features(student.backbone, student.transform)  # 1: its forward fills feats
    for name in order:  # 6: one stage per teacher, fresh adapters (2) and a fresh optimiser
        adapters = mtpd.make_adapters(student, models[name], images, features)
        opt = torch.optim.AdamW([*student.parameters(), *adapters.parameters()], lr=1e-4)
        for step in range(2):  # 3: the detection losses plus lam times the feature loss
            losses = mtpd.distill_losses(student.train(), images, targets, feats, [models[name]], [adapters],
                                         features, lam=1.0)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
    hooks.remove()  # a plain detector again; the adapters are dropped

With a detector of your own (no transform, no padding: the features carry no sizes):

    import torch, mtpd
    from torch import nn
    from torch.nn.functional import binary_cross_entropy_with_logits, interpolate

    class Neck(nn.Module):  # images [N, 3, H, W] -> levels at strides 2, 4, 8
        def __init__(self, width):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(c, width, 3, 2, 1) for c in (3, width, width))

        def forward(self, x):
            return [x := conv(x).relu() for conv in self.convs]

    class Net(nn.Module):  # a toy detector: one objectness logit per stride-8 cell, at input size `size`
        def __init__(self, width, size):
            super().__init__()
            self.size, self.neck, self.head = size, Neck(width), nn.Conv2d(width, 1, 1)

        def forward(self, images, targets):  # a loss dict, as torchvision's detectors in training
            logits = self.head(self.neck(interpolate(images, size=self.size))[-1])
            targets = interpolate(targets, logits.shape[-2:])
            return {"objectness": binary_cross_entropy_with_logits(logits, targets)}

    def features(model, images):
        x = interpolate(images, size=model.size)
        return mtpd.stride_keyed(x.shape[-2:], model.neck(x))

    student, teacher = Net(64, 64), mtpd.freeze(Net(128, 128))  # narrower and at half the resolution
    images, targets = torch.rand(4, 3, 128, 128), (torch.rand(4, 1, 16, 16) > 0.8).float()
    feats, hooks = mtpd.capture_features(student.neck)  # its first input is the image batch
    adapters = mtpd.make_adapters(student, teacher, images, features)  # 1x1 conv 64 -> 128, then 2x resize
    opt = torch.optim.AdamW([*student.parameters(), *adapters.parameters()], lr=1e-3)
    for step in range(3):
        losses = mtpd.distill_losses(student.train(), images, targets, feats, [teacher], [adapters], features)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


# 1. Feature capture (§3.1): distillation acts on the neck's outputs, level by level. ---------------------
class Levels(dict):
    """{stride: [N, C, h, w]}, plus `sizes`: each image's (h, w) in the model's input before the batch was
    padded (torchvision's ImageList.image_sizes), or None: then the maps are taken to hold no padding."""

    def __init__(self, levels=(), sizes=None):
        super().__init__(levels)
        self.sizes = None if sizes is None else [tuple(int(v) for v in hw) for hw in sizes]


def stride_keyed(input_hw, feats, sizes=None):
    """A neck's levels keyed by stride, so that two detectors pair level by level (RetinaNet's P3-P7 are
    strides 8..128, an R-CNN's P2-P6 4..64: pairing by list index would be wrong).
    input_hw: (H, W) of the padded input batch; feats: a dict or list of [N, C, h, w], finest or coarsest
    first; sizes: ImageList.image_sizes. Each level's stride is H / h rounded to a power of two, and at
    least twice the finer level's (P6 and P7 are both 1x1 on tiny inputs). -> Levels."""
    if isinstance(feats, torch.Tensor):  # iterating it would make one "level" per image
        raise TypeError(f"stride_keyed got one Tensor {list(feats.shape)}, not a neck's levels: pass the "
                        "dict or list of [N, C, h, w] levels, or wrap a single map as {'0': x}")
    levels = list(feats.values() if isinstance(feats, dict) else feats)
    if levels[0].shape[-2] < levels[-1].shape[-2]:
        levels = levels[::-1]  # finest first
    heights = [f.shape[-2] for f in levels]
    if heights != sorted(heights, reverse=True):
        raise ValueError(f"stride_keyed: level heights {heights} are neither finest nor coarsest first")
    keyed, stride = {}, 0
    for f in levels:
        stride = max(2 ** round(math.log2(input_hw[0] / f.shape[-2])), 2 * stride)
        keyed[stride] = f
    return Levels(keyed, sizes)


class _Hooks(list):
    def remove(self):
        for h in self:
            h.remove()


def capture_features(neck, transform=None, input_hw=None):
    """Hook `neck` (the module that maps the image batch to FPN levels: a torchvision detector's
    `backbone`) so that each forward also leaves its levels, keyed by stride, in the returned Levels: the
    student's features come from its own training forward, at no second pass. The input size is read from
    `transform` (torchvision's GeneralizedRCNNTransform, hooked too, which also gives the sizes before
    padding), else from `input_hw`, else from the neck's first input, which must then be the images
    [N, 3, H, W]. Returns (store, hooks); hooks.remove() removes them."""
    store, seen = Levels(), {}

    def on_transform(module, inputs, output):
        seen["hw"], seen["sizes"] = output[0].tensors.shape[-2:], output[0].image_sizes

    def on_neck(module, inputs, output):
        hw = seen.get("hw", input_hw)
        if hw is None:
            x = inputs[0] if inputs else None
            if not (torch.is_tensor(x) and x.dim() == 4 and x.shape[1] in (1, 3)):
                raise ValueError(f"capture_features: the first input of the hooked {type(module).__name__} "
                                 "is not the image batch [N, 3, H, W]: hook the module that takes the "
                                 "images, or pass transform= or input_hw= (the padded input's (H, W))")
            hw = x.shape[-2:]
        new = stride_keyed(hw, output, seen.get("sizes"))
        store.clear()
        store.update(new)
        store.sizes = new.sizes

    hooks = _Hooks([neck.register_forward_hook(on_neck)])
    if transform is not None:
        hooks.append(transform.register_forward_hook(on_transform))
    return store, hooks


def freeze(model):
    """A teacher (§3.1): eval mode, no gradients, never in an optimiser."""
    model.eval()
    return model.requires_grad_(False)


@contextlib.contextmanager
def eval_mode(*models):
    """Run the block with `models` in eval mode (a forward that must leave BatchNorm statistics alone),
    then give every submodule back its mode, also when the block raises."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# 2. Adapter phi (§3.1): a student level onto its teacher level. Training only, dropped at export. --------
def _cells(sizes, stride, hw):
    """Per image, the (rows, cols) of a level of `stride` and size hw that cover its content."""
    return [(min(math.ceil(h / stride), hw[0]), min(math.ceil(w / stride), hw[1])) for h, w in sizes]


def _resize(x, size):
    size = tuple(size)
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size, mode="bilinear", align_corners=False)


def _check_sizes(*sizes):
    if len({s is None for s in sizes}) > 1:
        raise ValueError("some features carry the images' sizes (Levels.sizes) and some do not: give every "
                         "model's the sizes before padding (capture_features(backbone, transform), "
                         "stride_keyed(..., batch.image_sizes)) or none")


def align(x, size, stride, student_sizes=None, teacher_sizes=None):
    """x [N, C, h, w] onto a teacher level of `size` (H, W). With the images' sizes, image by image: the
    cells covering its content in the student's map go onto those covering it in the teacher's (two
    models at different input scales pad differently; resizing whole padded maps would stretch one
    image's content onto padding). Without sizes, the whole maps. -> (y [N, C, H, W], mask [N, 1, H, W]
    of the teacher's content cells, or None when every image fills both maps)."""
    _check_sizes(student_sizes, teacher_sizes)
    hs, ht = tuple(x.shape[-2:]), tuple(size)
    if student_sizes is None:
        return _resize(x, size), None
    src, dst = _cells(student_sizes, stride, hs), _cells(teacher_sizes, stride, ht)
    if set(src) == {hs} and set(dst) == {ht}:
        return _resize(x, size), None
    ys, masks = [], []
    for i, ((h, w), (H, W)) in enumerate(zip(src, dst)):
        pad = (0, ht[1] - W, 0, ht[0] - H)
        ys.append(F.pad(_resize(x[i:i + 1, :, :h, :w], (H, W)), pad))
        masks.append(F.pad(x.new_ones(1, 1, H, W), pad))
    return torch.cat(ys), torch.cat(masks)


class Adapter(nn.Module):
    """phi for one level: a 1x1 conv when the widths differ (else identity), then resizing onto the
    teacher's map when the resolutions differ (align). x [N, Cs, h, w] -> ([N, Ct, H, W], mask)."""

    def __init__(self, student_channels, teacher_channels):
        super().__init__()
        self.channels = teacher_channels
        self.proj = (nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels
                     else nn.Identity())

    def forward(self, x, size, stride=None, student_sizes=None, teacher_sizes=None):
        return align(self.proj(x), size, stride, student_sizes, teacher_sizes)


@torch.no_grad()
def make_adapters(student, teacher, images, features):
    """A stage's fresh adapters, one per stride both models have, read off one batch; features(model,
    images) -> Levels runs a model's neck. The student runs in eval mode here (its BatchNorm statistics
    stay). Train the adapters with the student. -> nn.ModuleDict {str(stride): Adapter}."""
    with eval_mode(student):
        fs, ft = features(student, images), features(teacher, images)
    strides = sorted(set(fs) & set(ft))
    if not strides:
        raise ValueError(f"no common stride: the student has {sorted(fs)}, the teacher {sorted(ft)}")
    return nn.ModuleDict({str(s): Adapter(fs[s].shape[1], ft[s].shape[1]) for s in strides})


# 3. Feature loss (§3.1), or another mechanism per level (§3.4). -------------------------------------------
def feature_loss(student_feats, teacher_feats, adapters, *, normalize=True, mechanisms=None, boxes=None,
                 levels=None):
    """sum over strides and pixels of ||F_T - phi(F_S)||^2 over, with normalize, the teacher's variance
    (each channel about its own mean, pooled over levels: the cost's; 1 for a student of F_T's channel
    means), else the number of values (the paper's plain MSE). The teacher's padding is left out (align).
    mechanisms: {str(stride): m(phi(F_S), F_T, boxes, stride)} summed in place of the L2 (§3.4); boxes
    [n_i, 4] in the teacher's frame; levels: a dict that receives each stride's share (detached)."""
    ssz, tsz = getattr(student_feats, "sizes", None), getattr(teacher_feats, "sizes", None)
    errors, scales = [], []
    for key, adapter in adapters.items():
        ft = teacher_feats[int(key)].detach().float()  # [N, C, H, W]
        fs, mask = adapter(student_feats[int(key)], ft.shape[-2:], int(key), ssz, tsz)
        fs, w = fs.float(), 1.0 if mask is None else mask.float()  # w: [N, 1, H, W] content cells
        if mechanisms is not None:
            errors.append(mechanisms[key](fs if mask is None else fs + ft * (1 - w), ft, boxes, int(key)))
            continue
        n = ft[:, :1].numel() if mask is None else w.sum()  # cells compared, per channel
        errors.append(((fs - ft).pow(2) * w).sum())
        if normalize:
            mean = (ft * w).sum((0, 2, 3), keepdim=True) / n  # [1, C, 1, 1]
            scales.append(((ft - mean).pow(2) * w).sum())
        else:
            scales.append(n * ft.shape[1])
    if mechanisms is None:
        total = sum(scales)
        errors = [e / (total.clamp(min=1e-12) if torch.is_tensor(total) else total) for e in errors]
    if levels is not None:
        for key, e in zip(adapters, errors):
            levels[int(key)] = levels.get(int(key), 0.0) + e.detach()
    return sum(errors)


def distill_losses(student, images, targets, student_feats, teachers, adapters, teacher_features, *, lam=1.0,
                   normalize=True, mechanisms=None, teacher_boxes=None, levels=None):
    """One training forward (§3.1): the student's detection losses and 'distill' = lam * the sum over
    teachers (one a stage; several: the ensemble) of feature_loss. student: in train mode, its neck hooked
    (student_feats); teacher_features(teacher, images) runs a frozen teacher's neck, never its head."""
    if not student.training:
        raise ValueError("distill_losses: the student is in eval mode, where a detector returns detections "
                         "rather than losses: call student.train() (the teachers stay frozen)")
    losses = student(images, targets)  # fills student_feats through the hook
    total = 0.0
    for i, (teacher, adapter) in enumerate(zip(teachers, adapters)):
        with torch.no_grad():  # there is no backpropagation through the teacher
            ft = teacher_features(teacher, images)
            boxes = teacher_boxes(teacher, images, targets) if teacher_boxes else None
        total = total + feature_loss(student_feats, ft, adapter, normalize=normalize, boxes=boxes,
                                     mechanisms=None if mechanisms is None else mechanisms[i], levels=levels)
    losses["distill"] = lam * total
    return losses


# 4. Adaptation cost (§3.2): held-out error of the best linear 1x1 map from A's features to B's. ----------
def _rows(x):
    """[N, C, H, W] -> [N*H*W, C] in float64: a 1x1 conv is a per-pixel linear map of the channels."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()


def _content(f, sizes, stride):
    """Each image's map, cut to the cells its content covers (the whole map without sizes)."""
    cells = _cells(sizes, stride, f.shape[-2:]) if sizes is not None else [f.shape[-2:]] * len(f)
    return [f[i:i + 1, :, :h, :w] for i, (h, w) in enumerate(cells)]


def accumulate_moments(moments, split, feats):
    """Add one batch to the sufficient statistics of every ordered pair of models at their common strides.
    split: 'fit' or 'held'; feats: {model: Levels}, one forward of each model on the same images. Image by
    image, A's content is resized (bilinear: still linear) onto B's, X = [A's rows | 1], Y = B's rows:
    moments[(split, a, b, stride)] = [X'X, X'Y, sum Y, sum Y^2, rows] (float64, on the features' device)."""
    _check_sizes(*(getattr(f, "sizes", None) for f in feats.values()))
    for b, fb in feats.items():
        for a, fa in feats.items():
            for s in sorted(set(fa) & set(fb)) if a != b else []:
                crops = [_content(f[s], getattr(f, "sizes", None), s) for f in (fa, fb)]
                for xa, yb in zip(*crops):
                    x, y = _rows(_resize(xa.float(), yb.shape[-2:])), _rows(yb)
                    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)  # [P, Ca + 1]: the bias last
                    new = [x.T @ x, x.T @ y, y.sum(0), y.pow(2).sum(), len(y)]
                    old = moments.get((split, a, b, s))
                    moments[(split, a, b, s)] = new if old is None else [u + v for u, v in zip(old, new)]
    return moments


def costs_from_moments(moments, *, ridge=1e-2):
    """d(a -> b) = sum over strides of the held-out squared error of the ridge fit on 'fit', divided by the
    sum of B's held-out variance, each channel about its own mean (feature_loss's normalisation): the
    fraction of B's variance that no linear map of A explains; 0: B holds nothing A lacks. Pooling over
    strides weighs levels by pixels. W = (X'X + r I)^-1 X'Y, r = ridge * mean diag(X'X), bias free.
    Normalising changes no BGS decision (it compares costs into one target). -> {a: {b: float}}"""
    sums = {}
    for (split, a, b, s), (xx, xy, _, _, _) in moments.items():
        if split != "fit":
            continue
        if ("held", a, b, s) not in moments:
            raise ValueError("adaptation costs need held-out features: the 'held' split is empty")
        reg = torch.eye(len(xx), dtype=xx.dtype, device=xx.device) * ridge * xx.diagonal()[:-1].mean()
        reg[-1, -1] = 0.0
        w = torch.linalg.solve(xx + reg, xy)  # [Ca + 1, Cb]
        hxx, hxy, hsy, hyy, n = moments[("held", a, b, s)]
        sse = hyy - 2 * (w * hxy).sum() + (w * (hxx @ w)).sum()
        acc = sums.setdefault(a, {}).setdefault(b, [0.0, 0.0])
        acc[0] += float(sse.clamp(min=0))
        acc[1] += float(hyy - hsy.pow(2).sum() / n)
    return {a: {b: e / max(t, 1e-12) for b, (e, t) in row.items()} for a, row in sums.items()}


def adaptation_costs(batches, *, ridge=1e-2):
    """The cost matrix in one pass: batches yields (split, {model: Levels}); each model runs once per
    batch, so N models cost N forwards over the data, and no SGD. -> {a: {b: d(a -> b)}}"""
    moments = {}
    for split, feats in batches:
        accumulate_moments(moments, split, feats)
    return costs_from_moments(moments, ridge=ridge)


# 5. Backward Greedy Selection (§3.2, Algorithm 1). ------------------------------------------------------
def backward_greedy_selection(cost, student, teacher_ap, k):
    """The teacher order, first stage first. cost[a][b] = d(a -> b); teacher_ap: {teacher: validation AP};
    k: at most this many teachers. The last teacher is the best; then the remaining teacher closest to
    the current first one is prepended, until every remaining teacher is farther from it than the student
    itself is, or k teachers are chosen. Built backwards: the later teachers shape the student most."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    order = [max(teacher_ap, key=lambda t: (teacher_ap[t], t))]
    remaining = set(teacher_ap) - set(order)
    while remaining and len(order) < k:
        bridge = min(sorted(remaining), key=lambda t: cost[t][order[0]])
        if cost[bridge][order[0]] > cost[student][order[0]]:
            break  # the student is already closer than any bridge
        order.insert(0, bridge)
        remaining.remove(bridge)
    return order

# 6. Progressive distillation (§3.2): `for teacher in order:` one stage each, from the student the last one
# left, with fresh adapters and a fresh optimiser and LR schedule (the examples above; train.py's stages).
