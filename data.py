"""Data: the built-in "shapes" benchmark, a checked COCO-format dataset (ROOT/{train,val}2017/,
ROOT/annotations/instances_{train,val}2017.json) with torchvision's detection contract, COCO evaluation."""
import colorsys
import contextlib
import io
import json
import math
import os
import random
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from models import autocast


class InputError(ValueError):
    """Bad input (flags, files, data): train.py prints it as one line and exits with code 2."""


def fail(msg):
    raise InputError(msg)


def atomic_write(path, write, mode="w"):
    """write(f) fills a fsynced temp file that then replaces `path`: a crash leaves the old file or none."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# The built-in benchmark: shapes on cluttered, noisy backgrounds. ------------------------------------------
# Classes differ by outline and hue; weakly saturated clutter lets a detector trained from scratch on a CPU
# learn what an object is; small and occluded objects leave a teacher something to transfer. Ids as COCO's.
SHAPES = {"circle": 1, "triangle": 2, "square": 5, "star": 8, "cross": 9}
# Circumcircle diameters (px) in three bands: COCO's small, medium and large buckets all populated at 128 px.
SIZE_BANDS = [(0.45, 10, 36), (0.40, 40, 100), (0.15, 130, 180)]
MAX_COVER = 0.25  # at most this share of an object's box may be hidden: its amodal box stays predictable


def _outline(kind, cx, cy, r, rot):  # the polygon [(x, y), ...] of a shape of circumradius r
    if kind == "cross":
        a, b = r * 0.9, r * 0.32
        pts = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b),
               (-b, b), (-b, a)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    n, radii = {"circle": (32, [r]), "star": (10, [r, 0.45 * r]), "triangle": (3, [r]),
                "square": (4, [r])}[kind]
    return [(cx + radii[i % len(radii)] * math.cos(rot + 2 * math.pi * i / n),
             cy + radii[i % len(radii)] * math.sin(rot + 2 * math.pi * i / n)) for i in range(n)]


def _grey(rng):  # a weakly saturated colour for clutter: a round blob is not a circle of a class's hue
    v, s = rng.uniform(0.1, 1.0), rng.uniform(0.0, 0.25)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(rng.random(), s, v))


def _background(rng, h, w):
    base = np.array(_grey(rng), np.float32)
    tint = np.array([rng.randint(-40, 40) for _ in range(3)], np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy / h, xx / w
    ang = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(ang) * xx + math.sin(ang) * yy)[..., None]
    img = Image.fromarray(np.clip(base + tint * ramp, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, min(h, w) / 4)
        draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=_grey(rng))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        draw.line([(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)], fill=_grey(rng),
                  width=rng.randint(1, 2))
    return img


def _clip(pts, w, h):
    """Sutherland-Hodgman: the part of polygon `pts` inside [0, w] x [0, h]."""
    for axis, bound, keep in ((0, 0, 1), (0, w, -1), (1, 0, 1), (1, h, -1)):
        out = []
        for p, q in zip(pts, pts[1:] + pts[:1]):
            pin, qin = keep * (p[axis] - bound) >= 0, keep * (q[axis] - bound) >= 0
            if pin:
                out.append(p)
            if pin != qin:
                t = (bound - p[axis]) / (q[axis] - p[axis])
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
        pts = out
    return pts


def _covered(a, b):
    """The share of the smaller of boxes a, b that their intersection covers."""
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / max(min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])), 1e-9)


def _make_image(rng, h, w, max_objects):
    """(image, [(kind, polygon, xyxy box)]): big shapes first, so that small ones lie on top."""
    img = _background(rng, h, w)
    draw, objects = ImageDraw.Draw(img), []
    bands = rng.choices(SIZE_BANDS, [b[0] for b in SIZE_BANDS], k=rng.randint(1, max_objects))
    for side in sorted((rng.uniform(lo, hi) for _, lo, hi in bands), reverse=True):
        kind = rng.choice(list(SHAPES))
        for _ in range(20):  # place it; partial occlusion allowed (MAX_COVER)
            r = side / 2
            lo_x, lo_y = min(r, 0.35 * w), min(r, 0.35 * h)
            cx, cy = rng.uniform(lo_x, w - lo_x), rng.uniform(lo_y, h - lo_y)
            pts = _clip(_outline(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), w, h)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = [min(xs), min(ys), max(xs), max(ys)]
            if all(_covered(box, o[2]) <= MAX_COVER for o in objects):
                break
        else:
            continue
        hue = list(SHAPES).index(kind) / len(SHAPES) + rng.uniform(-0.06, 0.06)
        fill = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0))
        outline = tuple(rng.randint(0, 255) for _ in range(3)) if rng.random() < 0.5 else None
        draw.polygon(pts, fill=tuple(int(255 * c) for c in fill), outline=outline)
        objects.append((kind, pts, box))
    arr = np.asarray(img).astype(np.float32)
    noise = np.random.default_rng(rng.randint(0, 2 ** 31)).normal(0, rng.uniform(4, 16), arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8)), objects


def make_shapes(root, n_train=800, n_val=200, size=128, max_objects=6, seed=0, progress=True, sizes=None):
    """The shapes benchmark in COCO's layout, deterministic from `seed`: amodal polygons with their bbox and
    area. sizes: [(h, w), ...] cycled over the images (default size x size). -> counts by COCO's buckets."""
    if sizes is not None and (not sizes or any(len(s) != 2 or min(s) < 16 for s in sizes)):
        raise ValueError(f"sizes must be a non-empty list of (height, width) of at least 16 px, got {sizes}")
    stats, categories = {}, [{"id": i, "name": n, "supercategory": "shape"} for n, i in SHAPES.items()]
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 10 ** 6)):
        os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
        images, anns, buckets = [], [], {"small": 0, "medium": 0, "large": 0}
        for i in tqdm(range(n), desc=f"shapes {split}", disable=not progress, leave=False):
            h, w = sizes[i % len(sizes)] if sizes else (size, size)
            img, objects = _make_image(random.Random(seed * 7919 + offset + i), h, w, max_objects)
            img.save(os.path.join(root, f"{split}2017", f"{i:06d}.png"))
            images.append({"id": i + 1, "file_name": f"{i:06d}.png", "height": h, "width": w})
            for kind, pts, (x0, y0, x1, y1) in objects:
                area = 0.5 * abs(sum(a * d - c * b for (a, b), (c, d) in zip(pts, pts[1:] + pts[:1])))
                buckets["small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"] += 1
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": SHAPES[kind],
                             "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                             "area": round(area, 2), "iscrowd": 0,
                             "segmentation": [[round(c, 2) for p in pts for c in p]]})
        coco = {"images": images, "annotations": anns, "categories": categories,
                "info": {"description": f"mtpd shapes benchmark, seed {seed}"}}
        path = os.path.join(root, "annotations", f"instances_{split}2017.json")
        atomic_write(path, lambda f: json.dump(coco, f))  # last: its presence means "complete"
        stats[split] = {"images": n, **buckets}
    return stats


# A COCO-format dataset, checked before training starts. ---------------------------------------------------
def _ann_problem(a, images, cats):
    """What keeps annotation `a` from use, or None."""
    b, s, image = a["bbox"], a.get("segmentation", []), images.get(a["image_id"])
    if image is None:
        return f"image_id {a['image_id']} is not in 'images'"
    if a["category_id"] not in cats:
        return f"category_id {a['category_id']} is not in 'categories'"
    if not (isinstance(b, list) and len(b) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)):
        return f"bbox {str(b)[:60]} is not 4 numbers [x, y, w, h]"
    if isinstance(s, list):
        return None if all(isinstance(p, list) for p in s) else "segmentation is not a list of polygons"
    if not isinstance(s, dict) or "counts" not in s or "size" not in s:
        return "segmentation is neither polygons nor an RLE {counts, size}"
    hw = [image["height"], image["width"]]
    return None if s["size"] == hw else f"RLE size {s['size']} is not its image's [height, width] {hw}"


def read_annotations(path, image_dir):
    """A COCO instances file as a pycocotools COCO, checked: every problem (not JSON, keys or ids missing or
    repeated, a bad bbox or RLE, images missing) is one InputError naming the file."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        fail(f"annotation file {path} does not exist")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"annotation file {path} is not valid JSON ({str(e).splitlines()[0][:120]})")
    for key, need in (("images", ("id", "file_name", "height", "width")),
                      ("annotations", ("id", "image_id", "category_id", "bbox")), ("categories", ("id",))):
        if not isinstance(d, dict) or not isinstance(d.get(key), list):
            fail(f"annotation file {path} lacks '{key}': a COCO instances file needs 'images', "
                 "'annotations' and 'categories'")
        bad = next((x for x in d[key] if not isinstance(x, dict) or any(k not in x for k in need)), None)
        if bad is not None:
            fail(f"annotation file {path}: an entry of '{key}' lacks one of {list(need)}: {str(bad)[:80]}")
        dup = next((i for i, n in Counter(x["id"] for x in d[key]).items() if n > 1), None)
        if dup is not None:
            fail(f"annotation file {path}: id {dup} appears more than once in '{key}'")
    images, cats = {im["id"]: im for im in d["images"]}, {c["id"] for c in d["categories"]}
    for a in d["annotations"]:
        problem = _ann_problem(a, images, cats)
        if problem:
            fail(f"annotation file {path}: annotation {a['id']}: {problem}")
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    absent = [im["file_name"] for im in d["images"]
              if not os.path.isfile(os.path.join(image_dir, im["file_name"]))]
    if absent:
        fail(f"{len(absent)} image(s) listed in {path} are missing from {image_dir}, e.g. {absent[0]}")
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def ann_mask(segm, h, w):
    """[h, w] uint8 mask of a COCO segmentation: polygons, or an RLE with counts compressed or not."""
    if isinstance(segm, list):
        parts = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]  # fewer than 3 points: no area
        if not parts:
            return np.zeros((h, w), np.uint8)
        segm = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
    elif isinstance(segm["counts"], list):
        segm = mask_utils.frPyObjects(segm, h, w)
    return mask_utils.decode(segm)


def load_image(path):
    """[3, H, W] in 0-1 from any common mode; 16-bit grey scaled by 1/65535 (convert('RGB') would clip it)."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):
                grey = torch.from_numpy(np.asarray(img, np.float32) / 65535).clamp_(0, 1)  # [H, W]
                return grey[None].repeat(3, 1, 1)
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float().div_(255)
    except OSError as e:
        fail(f"cannot read image {path}: {e}")


class CocoDetection(torch.utils.data.Dataset):
    """(image [3, H, W] in 0-1, {boxes [N, 4] xyxy, labels [N] in 1..K (the sorted category ids), masks
    [N, H, W] with masks=True, image_id, flipped}); flip: the only augmentation (the cache relies on it).
    Crowds stay out of the targets (COCOeval reads them); boxes are clipped, dropped if under 1 px."""

    def __init__(self, root, split, flip=False, masks=True):
        self.root, self.split, self.flip, self.masks = root, split, flip, masks
        path = os.path.join(root, "annotations", f"instances_{split}2017.json")
        self.coco = read_annotations(path, os.path.join(root, f"{split}2017"))
        self.ids, self.category_ids = sorted(self.coco.imgs), sorted(self.coco.cats)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.instances, dropped = {}, 0  # image_id -> [(xyxy box, annotation)]
        for i in self.ids:
            w, h, self.instances[i] = self.coco.imgs[i]["width"], self.coco.imgs[i]["height"], []
            for a in self.coco.imgToAnns.get(i, []):
                x, y, bw, bh = a["bbox"]
                box = [min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)]
                if a.get("iscrowd", 0) or box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    dropped += not a.get("iscrowd", 0)
                    continue
                if masks and "segmentation" not in a:
                    fail(f"annotation file {path}: annotation {a['id']} has no 'segmentation'; a mask model "
                         "needs instance masks")
                self.instances[i].append((box, a))
        if dropped:
            print(f"{path}: dropped {dropped} degenerate boxes (under 1 px after clipping to the image)")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        return self.load(idx, self.flip and torch.rand(1).item() < 0.5)

    def load(self, idx, flip=False):
        info = self.coco.imgs[self.ids[idx]]
        h, w = info["height"], info["width"]
        file = os.path.join(self.root, f"{self.split}2017", info["file_name"])
        image = load_image(file)
        if image.shape[1:] != (h, w):
            fail(f"image {file} is {image.shape[2]}x{image.shape[1]} px, its annotation says {w}x{h}")
        kept = self.instances[self.ids[idx]]
        boxes = torch.tensor([b for b, _ in kept], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for _, a in kept], dtype=torch.int64)
        target = {"boxes": boxes, "labels": labels, "image_id": info["id"], "flipped": flip}
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack([ann_mask(a["segmentation"], h, w) for _, a in kept])
                                               if kept else np.zeros((0, h, w), np.uint8))
        if flip:
            image = image.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target

    def one_size(self):
        """Whether every image has one size (then every batch is padded alike)."""
        return len({(im["height"], im["width"]) for im in self.coco.imgs.values()}) == 1


def collate(batch):
    return tuple(zip(*batch))  # lists: torchvision's detectors take images of different sizes


# COCO evaluation. ---------------------------------------------------------------------------------------
SUMMARY_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


@torch.no_grad()
def predict(model, loader, category_ids, device, precision="fp32", progress=False):
    """COCO-format bbox and segm results of `model` over `loader`, with the data's category ids."""
    model.eval()
    bbox, segm = [], []
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        with autocast(device, precision):
            outputs = model([im.to(device, non_blocking=True) for im in images])
        for out, tgt in zip(outputs, targets):
            b = out["boxes"].float().cpu()
            b[:, 2:] -= b[:, :2]  # xyxy -> xywh
            rows = zip(b.tolist(), out["scores"].tolist(), out["labels"].tolist())
            for i, (box, score, label) in enumerate(rows):
                det = {"image_id": tgt["image_id"], "category_id": category_ids[label - 1],
                       "bbox": [round(v, 2) for v in box], "score": round(score, 4)}
                bbox.append(det)
                if "masks" in out:
                    m = (out["masks"][i, 0] > 0.5).cpu().numpy().astype(np.uint8)
                    rle = mask_utils.encode(np.asfortranarray(m))
                    segm.append({**det, "segmentation": {**rle, "counts": rle["counts"].decode("ascii")}})
    return bbox, segm


def coco_summary(coco_gt, results, iou_type):
    """COCOeval's 12 summary numbers (SUMMARY_KEYS) and the 12 lines it prints. No results score 0."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        if results:
            dt = coco_gt.loadRes([dict(r) for r in results])  # copies: loadRes adds keys
        else:  # loadRes refuses an empty list
            dt = COCO()
            dt.dataset = {**coco_gt.dataset, "annotations": []}
            dt.createIndex()
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        out.seek(0)
        out.truncate()
        ev.summarize()
    return {k: float(v) for k, v in zip(SUMMARY_KEYS, ev.stats)}, out.getvalue().rstrip("\n")


def score(coco_gt, bbox, segm=()):
    """Box metrics (SUMMARY_KEYS), and the mask ones with a 'mask_' prefix when there are masks."""
    out = coco_summary(coco_gt, bbox, "bbox")[0]
    if segm:
        out.update({f"mask_{k}": v for k, v in coco_summary(coco_gt, segm, "segm")[0].items()})
    return out
