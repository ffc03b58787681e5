"""The feature-distillation mechanisms MTPD wraps (§3.4, Fig. 4), usable in any stage in place of the L2:

    CWD   channel-wise distillation              Shu et al., ICCV 2021, arXiv 2011.13256
    FGD   focal and global distillation          Yang et al., CVPR 2022, arXiv 2111.11837
    MGD   masked generative distillation         Yang et al., ECCV 2022, arXiv 2205.01529
    PKD   Pearson-correlation distillation       Cao et al., NeurIPS 2022, arXiv 2207.02039

Each is an nn.Module for one FPN level: mech(fs, ft, boxes=None, stride=None) -> a float32 scalar, with fs
[N, C, H, W] the student's level after mtpd's Adapter, ft the teacher's (no gradient flows into it); FGD
alone uses boxes ([n_i, 4] xyxy in the teacher's input frame) and the stride. Learnable parts train with the
student and are dropped at export. Torch only; the formulas follow the authors' code (yzd-v/FGD, yzd-v/MGD,
mmrazor's CWD and PKD), and where they differ it says "deviation".
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
    """CWD: each channel softmaxed over its positions, p = softmax_HW(F / tau), is where it fires; loss =
    weight * tau^2 * sum_{n,c} KL(p_T || p_S) / (N * C). Published: tau 1, weight 5 (RetinaNet)."""

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
    """FGD's masks for a level of `stride` and size (H, W), boxes [n_i, 4] xyxy in input pixels: a box covers
    cells floor(x1/s)..ceil(x2/s) (both ends, as the authors' code) and each gets 1 / its cell count (the
    smaller box wins an overlap); background 1 / (#cells outside every box). Rows are y. Deviation: boxes
    are divided by the stride (the original scales them by the unpadded size against the padded map,
    shifting masks on padded batches). -> (fg [N, H, W], bg [N, H, W]), float32."""
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
    """GCNet's global context block (arXiv 1904.11492) as FGD uses it: x [N, C, H, W] -> x + transform(the
    average of x weighted by a softmax over positions of a 1x1 conv), transform conv1x1 -> LayerNorm ->
    ReLU -> conv1x1, its last conv zero at first (the identity)."""

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
    """Spatial H*W softmax_HW(mean_c |x| / T) [N, H, W] and channel C softmax_C(mean_hw |x| / T) [N, C]."""
    n, c, h, w = x.shape
    a = x.abs()
    spatial = h * w * F.softmax(a.mean(1).flatten(1) / temp, dim=1).view(n, h, w)
    channel = c * F.softmax(a.mean((2, 3)) / temp, dim=1)
    return spatial, channel


def input_boxes(teacher, images, targets):
    """The targets' boxes in the frame of the teacher's padded input: what FGD's masks need."""
    return [t["boxes"] for t in teacher.transform(images, [{"boxes": t["boxes"]} for t in targets])[1]]


class FGD(nn.Module):
    """FGD: squared errors weighted by the teacher's spatial and channel attention, summed over the
    foreground and background masks (fg, bg); an attention loss sum |A^S - A^T| / N; a global loss between
    learnable GcBlocks of student and teacher. loss = weight * (alpha fg + beta bg + gamma attention + lam
    global), each / N. Published (RetinaNet): temp 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4, lam 5e-6."""

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
    """MGD: each position of the student's map dropped with probability mask_ratio (one mask for all
    channels, drawn at every call), then `generation` (conv3x3 -> ReLU -> conv3x3) rebuilds the teacher's
    map: loss = weight * alpha * sum((G(F_S * M) - F_T)^2) / N. Published (RetinaNet): alpha 2e-5, 0.65."""

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
    """PKD: each channel standardised over (N, H, W), loss = weight * MSE / 2 = the mean over channels of
    1 - Pearson r: blind to each channel's scale and offset. Published: weight 10 (RetinaNet). Deviation:
    the population std (mmrazor's sample std gives (1 - 1/NHW)(1 - r))."""

    def __init__(self, channels, weight=10.0, eps=1e-6):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, fs, ft, boxes=None, stride=None):
        fs, ft = _pair(fs, ft)
        return self.weight * F.mse_loss(_standardise(fs, self.eps), _standardise(ft, self.eps)) / 2


NAMES = ("l2", "cwd", "fgd", "mgd", "pkd")
MECHANISMS = {"cwd": CWD, "fgd": FGD, "mgd": MGD, "pkd": PKD}

# Our `weight` on top of each class's (published, RetinaNet) defaults. The published weights were tuned for
# mmdet's 256-channel FPNs, 800-px images and sum reductions; these bring each loss, summed over the levels,
# to ~1 at the start of a stage, the order of the detection loss (see RESULTS.md, "Mechanism loss weights").
BENCHMARK = dict(cwd=0.1, fgd=0.005, mgd=0.1, pkd=0.2)


def make(name, channels, **overrides):
    """The mechanism `name` for a level of `channels` channels: published defaults, BENCHMARK's weight."""
    if name not in MECHANISMS:
        raise ValueError(f"unknown mechanism '{name}'; known: {', '.join(MECHANISMS)}")
    return MECHANISMS[name](channels, **{"weight": BENCHMARK[name], **overrides})
