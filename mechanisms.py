"""Feature-distillation mechanisms that MTPD wraps (Cao et al., ICML 2023, §3.4 and Fig. 4): each stage of
the progressive schedule can use any of them in place of the plain L2 of §3.1.

    L2    ||F_T - phi(F_S)||^2 / Var(F_T)        mtpd.feature_loss itself, not a module here
    CWD   channel-wise distillation              Shu et al., ICCV 2021, arXiv 2011.13256
    FGD   focal and global distillation          Yang et al., CVPR 2022, arXiv 2111.11837
    MGD   masked generative distillation         Yang et al., ECCV 2022, arXiv 2205.01529
    PKD   Pearson-correlation distillation       Cao et al., NeurIPS 2022, arXiv 2207.02039

Every mechanism is an nn.Module for ONE FPN level pair with the same call:

    loss = mech(fs, ft, boxes=None, stride=None)  ->  scalar float32

fs [N, C, H, W]: the student's level already passed through mtpd's Adapter (so it has the teacher's shape);
ft [N, C, H, W]: the teacher's level (no gradient ever flows into it). boxes: list of N tensors [n_i, 4] xyxy
in the pixel frame of the teacher's padded input batch; stride: the level's stride in those pixels (only FGD
uses them). The caller sums the losses over the common strides, one module per level. Learnable parts (FGD's
GcBlocks, MGD's generation block) train with the student and are dropped at export, like the adapters.
Everything is computed in float32, autocast or not: sums of squares over a whole map need the mantissa.

It imports torch only. The formulas follow the authors' code (yzd-v/FGD, yzd-v/MGD, open-mmlab/mmrazor for
CWD and PKD); the few places where they differ are marked "deviation".
"""
import torch
import torch.nn.functional as F
from torch import nn


def _pair(fs, ft):
    """float32 copies; the teacher detached once more (there is no backpropagation through the teacher)."""
    if fs.shape != ft.shape:
        raise ValueError(f"student level {tuple(fs.shape)} != teacher level {tuple(ft.shape)}: pass the "
                         "student through its mtpd Adapter first")
    return fs.float(), ft.detach().float()


class CWD(nn.Module):
    """Channel-wise distillation (Shu et al. 2021): each channel, softmaxed over its H*W positions, is a
    distribution over where that channel fires; the student matches the teacher's with KL(p_T || p_S).

    loss = weight * tau^2 * sum_{n,c} KL(p_T || p_S) / (N * C),   p = softmax_{HW}(F / tau).
    Defaults: tau 1, weight 5 (the authors' mmdet port, RetinaNet). mmrazor's RetinaNet/R-CNN configs use
    weight 10 with the same formula.
    """

    def __init__(self, channels, tau=1.0, weight=5.0):
        super().__init__()
        self.tau, self.weight = tau, weight

    def forward(self, fs, ft, boxes=None, stride=None):
        fs, ft = _pair(fs, ft)
        n, c = ft.shape[:2]
        log_ps = F.log_softmax(fs.flatten(2) / self.tau, dim=2)  # [N, C, H*W]
        log_pt = F.log_softmax(ft.flatten(2) / self.tau, dim=2)  # [N, C, H*W]
        kl = (log_pt.exp() * (log_pt - log_ps)).sum()
        return self.weight * self.tau ** 2 * kl / (n * c)


def fgd_masks(boxes, stride, H, W):
    """FGD's foreground / background masks for one level (Yang et al. 2022, §3.1 of FGD).

    boxes: list of N tensors [n_i, 4] xyxy in input pixels; stride: pixels per cell of this level.
    A box covers the cells floor(y1/s)..ceil(y2/s) x floor(x1/s)..ceil(x2/s), both ends included, and each
    covered cell gets 1/area with area = (hmax - hmin + 1) * (wmax - wmin + 1) cells, as the authors' code
    (the count includes cells a box's ceil pushes past the border); where boxes overlap the smaller box,
    i.e. the larger value, wins. Background = 1 / (#cells with fg == 0) there, 0 elsewhere (all 0 if the
    whole level is foreground). So fg weighs every object equally whatever its size and bg sums to 1.
    Rows are y, columns x, as mmrazor's port and one version of the authors' file (another version of that
    file indexes rows by x: a transposition).
    Deviation: the original scales boxes by the unpadded image size against the padded map's H, W, which
    shifts masks on padded batches; dividing by the stride keeps them in the padded frame.
    Returns (fg [N, H, W], bg [N, H, W]) float32 on the boxes' device.
    """
    fg, bg = [], []
    for b in boxes:
        b = b.detach().float().reshape(-1, 4) / stride  # [n, 4] in cells
        xmin, ymin = b[:, 0].floor(), b[:, 1].floor()
        xmax, ymax = b[:, 2].ceil(), b[:, 3].ceil()
        area = (ymax - ymin + 1) * (xmax - xmin + 1)  # [n]
        ys = torch.arange(H, device=b.device, dtype=b.dtype)
        xs = torch.arange(W, device=b.device, dtype=b.dtype)
        in_y = (ys >= ymin[:, None]) & (ys <= ymax[:, None])  # [n, H]
        in_x = (xs >= xmin[:, None]) & (xs <= xmax[:, None])  # [n, W]
        per_box = (in_y[:, :, None] & in_x[:, None, :]) / area[:, None, None]  # [n, H, W]
        m = per_box.amax(0) if len(b) else torch.zeros(H, W, device=b.device)  # max where boxes overlap
        back = (m == 0).float()
        fg.append(m)
        bg.append(back / back.sum().clamp(min=1))
    return torch.stack(fg), torch.stack(bg)


class GcBlock(nn.Module):
    """Global context block (Cao et al., GCNet, ICCVW 2019, arXiv 1904.11492) as FGD uses it.

    x [N, C, H, W] -> x + transform(context): context [N, C, 1, 1] is the average of x over positions,
    weighted by a softmax over H*W of a 1x1 conv (one logit per position); the transform is
    conv1x1(C, C/2) -> LayerNorm -> ReLU -> conv1x1(C/2, C). The last conv starts at zero (as the original),
    so at first the block is the identity and only that conv receives gradient.
    """

    def __init__(self, channels):
        super().__init__()
        self.context = nn.Conv2d(channels, 1, 1)
        half = channels // 2
        self.transform = nn.Sequential(nn.Conv2d(channels, half, 1), nn.LayerNorm([half, 1, 1]), nn.ReLU(),
                                       nn.Conv2d(half, channels, 1))
        nn.init.kaiming_normal_(self.context.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x):
        attn = F.softmax(self.context(x).flatten(1), dim=1)  # [N, H*W]
        context = torch.einsum("ncp,np->nc", x.flatten(2), attn)[:, :, None, None]  # [N, C, 1, 1]
        return x + self.transform(context)


def fgd_attention(x, temp):
    """FGD's attentions of a map x [N, C, H, W]: spatial A_S = H*W * softmax_{HW}(mean_c |x| / T) [N, H, W]
    and channel A_C = C * softmax_C(mean_hw |x| / T) [N, C]; both average 1."""
    n, c, h, w = x.shape
    a = x.abs()
    spatial = h * w * F.softmax(a.mean(1).flatten(1) / temp, dim=1).view(n, h, w)
    channel = c * F.softmax(a.mean((2, 3)) / temp, dim=1)
    return spatial, channel


class FGD(nn.Module):
    """Focal and global distillation (Yang et al. 2022).

    Focal part: squared feature errors weighted by the TEACHER's spatial and channel attention and by the
    fg / bg masks of `fgd_masks`: fg = sum(M_fg A_S A_C (F_S - F_T)^2) / N, bg likewise with M_bg; plus the
    attention loss sum|A_C^S - A_C^T| / N + sum|A_S^S - A_S^T| / N, which teaches the student where the
    teacher looks. (The original multiplies both maps by sqrt(mask * attention) before a summed MSE: the
    same number.) Global part: sum(GcBlock_S(F_S) - GcBlock_T(F_T))^2 / N with two learnable GcBlocks,
    the first on the student, the second on the teacher's (frozen) features.
    loss = weight * (alpha * fg + beta * bg + gamma * attention + lam * global).
    Defaults (RetinaNet): temp 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4, lam 5e-6; Faster/Mask R-CNN:
    temp 0.5, alpha 5e-5, beta 2.5e-5, gamma 5e-5, lam 5e-7. The original's 1x1 align conv for differing
    channel counts is not needed: mtpd's Adapter has already mapped the student to the teacher's shape.
    """

    needs_boxes = True  # the caller passes the ground truth only to mechanisms that use it

    def __init__(self, channels, temp=0.5, alpha=1e-3, beta=5e-4, gamma=5e-4, lam=5e-6, weight=1.0):
        super().__init__()
        self.temp, self.alpha, self.beta, self.gamma, self.lam = temp, alpha, beta, gamma, lam
        self.weight = weight
        self.gc_student, self.gc_teacher = GcBlock(channels), GcBlock(channels)

    def forward(self, fs, ft, boxes=None, stride=None):
        if boxes is None or stride is None:
            raise ValueError("FGD needs the ground-truth boxes and the level's stride")
        fs, ft = _pair(fs, ft)
        n, _, h, w = ft.shape
        with torch.autocast(ft.device.type, enabled=False):  # the GcBlocks' convs in float32 too
            s_t, c_t = fgd_attention(ft, self.temp)  # [N, H, W], [N, C]
            s_s, c_s = fgd_attention(fs, self.temp)
            fg, bg = (m.to(ft.device) for m in fgd_masks(boxes, stride, h, w))  # [N, H, W] each
            err = (fs - ft) ** 2 * s_t[:, None] * c_t[:, :, None, None]  # [N, C, H, W]
            fg_loss = (err * fg[:, None]).sum() / n
            bg_loss = (err * bg[:, None]).sum() / n
            attention_loss = (c_s - c_t).abs().sum() / n + (s_s - s_t).abs().sum() / n
            global_loss = ((self.gc_student(fs) - self.gc_teacher(ft)) ** 2).sum() / n
        return self.weight * (self.alpha * fg_loss + self.beta * bg_loss + self.gamma * attention_loss
                              + self.lam * global_loss)


class MGD(nn.Module):
    """Masked generative distillation (Yang et al. 2022): hide random positions of the student's map and
    make a small generation block reconstruct the teacher's whole map from what is left.

    M [N, 1, H, W]: each position dropped with probability mask_ratio (the paper's lambda), one mask shared
    by all channels (the original: u ~ U[0, 1), keep where u <= 1 - lambda), drawn with torch.rand on the
    feature's device, so torch.manual_seed makes it repeatable. It is drawn on every call, as the original.
    G = conv3x3 -> ReLU -> conv3x3 (C -> C), the attribute `generation` (a test can swap in nn.Identity).
    loss = weight * alpha * sum((G(F_S * M) - F_T)^2) / N.
    Defaults (RetinaNet): alpha 2e-5, mask_ratio 0.65; Faster/Mask R-CNN: alpha 5e-7, mask_ratio 0.45.
    """

    def __init__(self, channels, alpha=2e-5, mask_ratio=0.65, weight=1.0):
        super().__init__()
        self.alpha, self.mask_ratio, self.weight = alpha, mask_ratio, weight
        self.generation = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, fs, ft, boxes=None, stride=None):
        fs, ft = _pair(fs, ft)
        n, _, h, w = ft.shape
        keep = torch.rand(n, 1, h, w, device=fs.device) <= 1 - self.mask_ratio  # [N, 1, H, W]
        with torch.autocast(fs.device.type, enabled=False):
            new = self.generation(fs * keep)  # [N, C, H, W]
        return self.weight * self.alpha * ((new - ft) ** 2).sum() / n


def _standardise(x, eps):
    """Each channel of x [N, C, H, W] to zero mean / unit (population) variance over (N, H, W)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    std = x.std((0, 2, 3), keepdim=True, correction=0)
    return (x - mean) / (std + eps)


class PKD(nn.Module):
    """Pearson-correlation distillation (Cao et al. 2022): standardise each channel of student and teacher
    over (N, H, W), then loss = weight * MSE / 2. With population std this is exactly the mean over
    channels of 1 - r_c, r_c the Pearson correlation of channel c: it ignores the scale and offset of each
    channel, so a student is not pushed towards the teacher's feature magnitudes.
    Defaults: weight 10 (RetinaNet); 6 for Faster R-CNN.
    Deviation: mmrazor divides by the sample std (Bessel's correction), which gives (1 - 1/(NHW)) * (1 - r);
    the two agree except on the coarsest levels of tiny batches.
    """

    def __init__(self, channels, weight=10.0, eps=1e-6):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, fs, ft, boxes=None, stride=None):
        fs, ft = _pair(fs, ft)
        return self.weight * F.mse_loss(_standardise(fs, self.eps), _standardise(ft, self.eps)) / 2


# The command line's choices: "l2" is mtpd.feature_loss (no module, so not in MECHANISMS), the others
# are the modules above.
NAMES = ("l2", "cwd", "fgd", "mgd", "pkd")
MECHANISMS = {"cwd": CWD, "fgd": FGD, "mgd": MGD, "pkd": PKD}

# Our `weight` on top of each class's (published, RetinaNet) defaults. The published weights were tuned for
# mmdet's 256-channel FPNs, 800-px images and sum reductions; these bring each loss, summed over the levels,
# to ~1 at the start of a stage, the order of the detection loss (see RESULTS.md, "Mechanism loss weights").
BENCHMARK = dict(cwd=0.1, fgd=0.005, mgd=0.1, pkd=0.2)


def make(name, channels, published=False, **overrides):
    """The mechanism `name` (one of MECHANISMS) for one level of `channels` channels: the class's defaults
    (the published settings) with BENCHMARK's weight, or without it when `published`; `overrides` on top."""
    if name == "l2":
        raise ValueError("the L2 is mtpd.feature_loss, not a mechanism module: pass mechanisms=None to it")
    if name not in MECHANISMS:
        raise ValueError(f"unknown mechanism '{name}'; known: {', '.join(MECHANISMS)}")
    kw = {} if published else {"weight": BENCHMARK[name]}
    kw.update(overrides)
    return MECHANISMS[name](channels, **kw)
