"""Data for mtpd: the embedded "shapes" benchmark (written as a real COCO-format dataset), a COCO-format
dataset with torchvision's detection contract, and COCO evaluation with pycocotools.

Layout (COCO 2017): ROOT/train2017/*.png, ROOT/val2017/*.png, ROOT/annotations/instances_{split}2017.json.
"""
import collections
import colorsys
import contextlib
import io
import json
import math
import os
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models import autocast

# ---------------------------------------------------------------------------------------------------------
# Files are written whole or not at all: the annotations below, results, checkpoints (engine), reports.
# ---------------------------------------------------------------------------------------------------------
def atomic_write(path, write, mode="w"):
    """Write `path` atomically: write(f) fills a temp file in the same folder, flushed and fsynced, which
    then replaces `path` (os.replace): a crash leaves the old file or none, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# The embedded benchmark: shapes on cluttered, noisy backgrounds.
# ---------------------------------------------------------------------------------------------------------
# Classes differ by outline and by a typical hue (jittered, with random saturation and brightness). The
# background and its clutter (soft blobs, thin lines) are weakly saturated, so that from scratch on a CPU
# budget a detector can learn what an object is at all; small objects (a few pixels at low resolution) and
# partial occlusion leave a higher-resolution or bigger teacher something to transfer. (Measured: with
# saturated backgrounds and unlimited occlusion, RetinaNet-R18 stayed below 5 AP after 1000 steps.)
# Category ids are deliberately not 1..K (like COCO's).
SHAPES = {"circle": 1, "triangle": 2, "square": 5, "star": 8, "cross": 9}
# Object sizes (circumcircle diameters, px) are drawn from three bands so that COCO's small (< 32^2),
# medium and large (> 96^2) area buckets are all populated even at 128 px; large shapes may extend past
# the border (clipped, as in real photos).
SIZE_BANDS = [(0.45, 10, 36), (0.40, 40, 100), (0.15, 130, 180)]
MAX_COVER = 0.25  # at most this share of an object's box may be hidden: its amodal box stays predictable


def _outline(kind, cx, cy, r, rot):
    """Polygon [(x, y), ...] of a shape of circumradius r."""
    if kind == "circle":
        n, radii = 32, [r]
    elif kind == "star":
        n, radii = 10, [r, 0.45 * r]
    elif kind == "cross":  # a plus sign: 12 corners
        a, b = r * 0.9, r * 0.32
        pts = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b),
               (-b, b), (-b, a)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        n, radii = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[kind], [r]
    return [(cx + radii[i % len(radii)] * math.cos(rot + 2 * math.pi * i / n),
             cy + radii[i % len(radii)] * math.sin(rot + 2 * math.pi * i / n)) for i in range(n)]


def _background(rng, h, w):
    """Smooth weakly-saturated gradient + texture blobs + distractor lines (pixel noise comes last)."""
    base = np.array(_grey(rng), np.float32)
    tint = np.array([rng.randint(-40, 40) for _ in range(3)], np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy / h, xx / w
    ang = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(ang) * xx + math.sin(ang) * yy)[..., None]
    img = Image.fromarray(np.clip(base + tint * ramp, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):  # soft blobs (clutter, not objects)
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, min(h, w) / 4)
        draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=_grey(rng))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):  # thin distractor lines
        pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2)]
        draw.line(pts, fill=_grey(rng), width=rng.randint(1, 2))
    return img


def _colour(rng):
    return tuple(rng.randint(0, 255) for _ in range(3))


def _grey(rng):
    """A weakly saturated colour for clutter, so that a round blob is not a circle of some class's hue."""
    v, s = rng.uniform(0.1, 1.0), rng.uniform(0.0, 0.25)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(rng.random(), s, v))


def _class_colour(rng, kind):
    hue = list(SHAPES).index(kind) / len(SHAPES) + rng.uniform(-0.06, 0.06)
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0))
    return int(255 * r), int(255 * g), int(255 * b)


def _polygon_area(pts):
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])))


def _make_image(rng, h, w, max_objects, crowd_rng=None):
    """(image, objects [(kind, polygon, xyxy box)], crowd (kind, [h, w] mask) or None). crowd_rng: a
    generator of its own for the crowd region, so that asking for crowds leaves the objects as they were."""
    img = _background(rng, h, w)
    draw = ImageDraw.Draw(img)
    objects, boxes = [], []
    n = rng.randint(1, max_objects)
    bands = rng.choices(SIZE_BANDS, [b[0] for b in SIZE_BANDS], k=n)
    sides = sorted((rng.uniform(lo, hi) for _, lo, hi in bands), reverse=True)  # big first: small on top
    for side in sides:
        kind = rng.choice(list(SHAPES))
        for _ in range(20):  # place it; partial occlusion allowed (MAX_COVER)
            r = side / 2
            lo_x, lo_y = min(r, 0.35 * w), min(r, 0.35 * h)
            cx, cy = rng.uniform(lo_x, w - lo_x), rng.uniform(lo_y, h - lo_y)
            pts = _clip(_outline(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), w, h)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = [min(xs), min(ys), max(xs), max(ys)]
            if all(_covered(box, b) <= MAX_COVER for b in boxes):
                break
        else:
            continue
        draw.polygon(pts, fill=_class_colour(rng, kind), outline=_colour(rng) if rng.random() < 0.5 else None)
        boxes.append(box)
        objects.append((kind, pts, box))
    crowd = _crowd(crowd_rng, img, boxes) if crowd_rng is not None else None
    arr = np.asarray(img).astype(np.float32)
    noise = np.random.default_rng(rng.randint(0, 2 ** 31)).normal(0, rng.uniform(4, 16), arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8)), objects, crowd


def _crowd(rng, img, boxes):
    """Draw a crowd on `img`: a cluster of 6-16 small shapes of one class, too close together to annotate
    one by one, which COCO labels as one iscrowd=1 region. It goes where it hides at most MAX_COVER of an
    object's box (as objects do each other). Returns (kind, [h, w] uint8 mask of its shapes), or None
    when no place was found."""
    w, h = img.size
    kind = rng.choice(list(SHAPES))
    side = rng.uniform(0.2, 0.4) * min(h, w)
    rw, rh = min(w, side * rng.uniform(0.7, 1.4)), min(h, side * rng.uniform(0.7, 1.4))
    for _ in range(50):
        x0, y0 = rng.uniform(0, w - rw), rng.uniform(0, h - rh)
        region = [x0, y0, x0 + rw, y0 + rh]
        if all(_covered(region, b) <= MAX_COVER for b in boxes):
            break
    else:
        return None
    draw, mask = ImageDraw.Draw(img), Image.new("L", (w, h), 0)
    for _ in range(rng.randint(6, 16)):  # members of 5-12 px: each well under COCO's 32^2 "small"
        r = min(rng.uniform(2.5, 6), rw / 2, rh / 2)
        cx, cy = rng.uniform(x0 + r, x0 + rw - r), rng.uniform(y0 + r, y0 + rh - r)
        pts = _clip(_outline(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), w, h)
        draw.polygon(pts, fill=_class_colour(rng, kind))
        ImageDraw.Draw(mask).polygon(pts, fill=1)
    mask = np.asarray(mask, np.uint8)
    return (kind, mask) if mask.any() else None


def _rle_counts(mask):
    """Uncompressed RLE counts of a [h, w] mask, as COCO stores its crowd regions: run lengths in column-major
    order, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    return ([0] if flat[0] else []) + np.diff(bounds).tolist()


def _clip(pts, w, h):
    """Sutherland-Hodgman: the part of polygon `pts` inside [0, w] x [0, h]."""
    for axis, bound, keep in ((0, 0, 1), (0, w, -1), (1, 0, 1), (1, h, -1)):
        out = []
        for p, q in zip(pts, pts[1:] + pts[:1]):
            pin, qin = keep * (p[axis] - bound) >= 0, keep * (q[axis] - bound) >= 0
            if pin:
                out.append(p)
            if pin != qin:  # the edge crosses the boundary
                t = (bound - p[axis]) / (q[axis] - p[axis])
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
        pts = out
    return pts


def _covered(a, b):
    """The share of the smaller of boxes a, b that their intersection covers."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(smaller, 1e-9)


def make_shapes(root, n_train=800, n_val=200, size=128, max_objects=6, seed=0, progress=True, sizes=None,
                crowd=0.0):
    """Write the shapes benchmark to `root` in COCO 2017 layout; deterministic from `seed`.

    Annotations are amodal polygons (an occluded shape keeps its whole outline), with COCO's bbox
    [x, y, w, h], area (polygon area, which COCOeval uses for the small/medium/large buckets) and iscrowd=0.
    sizes: [(height, width), ...] cycled over each split's images (image i has sizes[i % len(sizes)]), e.g.
    COCO's aspect ratios 4:3, 3:4, 3:2 at a small scale; default: every image is size x size.
    crowd: the share of images that also get a crowd region (COCO's iscrowd=1) where one fits beside the
    objects: a cluster of small shapes of one class annotated as one region, an uncompressed RLE with the
    bbox and area of its pixels. The objects are the same with and without crowds (the crowds draw from a
    generator of their own).
    Returns {split: {"images": n, "small": n, "medium": n, "large": n}}, with "crowd": n when crowd > 0.
    """
    from tqdm import tqdm
    if sizes is not None:
        sizes = [tuple(s) for s in sizes]
        if not sizes or any(len(s) != 2 or not all(isinstance(v, int) and v >= 16 for v in s) for s in sizes):
            raise ValueError(f"sizes must be a non-empty list of (height, width) of at least 16 px each, "
                             f"got {sizes}")
    if not 0 <= crowd <= 1:
        raise ValueError(f"crowd is the share of images with a crowd region, in [0, 1], got {crowd}")
    stats = {}
    categories = [{"id": i, "name": n, "supercategory": "shape"} for n, i in SHAPES.items()]
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 10 ** 6)):
        os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
        images, anns, buckets = [], [], {"small": 0, "medium": 0, "large": 0}
        if crowd > 0:
            buckets["crowd"] = 0
        for i in tqdm(range(n), desc=f"shapes {split}", disable=not progress, leave=False):
            rng = random.Random(seed * 7919 + offset + i)
            h, w = sizes[i % len(sizes)] if sizes else (size, size)
            crowd_rng = random.Random(f"crowd {seed} {split} {i}")  # its own: the objects stay the same
            if crowd_rng.random() >= crowd:
                crowd_rng = None
            img, objects, crowd_region = _make_image(rng, h, w, max_objects, crowd_rng)
            name = f"{i:06d}.png"
            img.save(os.path.join(root, f"{split}2017", name))
            images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
            for kind, pts, (x0, y0, x1, y1) in objects:
                area = _polygon_area(pts)
                buckets["small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"] += 1
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": SHAPES[kind],
                             "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                             "area": round(area, 2), "iscrowd": 0,
                             "segmentation": [[round(c, 2) for p in pts for c in p]]})
            if crowd_region is not None:
                kind, mask = crowd_region
                ys, xs = np.nonzero(mask)
                x0, y0 = int(xs.min()), int(ys.min())
                box = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]  # of its pixels, as toBbox
                buckets["crowd"] += 1
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": SHAPES[kind], "bbox": box,
                             "area": int(mask.sum()), "iscrowd": 1,
                             "segmentation": {"size": [h, w], "counts": _rle_counts(mask)}})
        coco = {"images": images, "annotations": anns, "categories": categories,
                "info": {"description": f"mtpd shapes benchmark, seed {seed}"}}
        path = os.path.join(root, "annotations", f"instances_{split}2017.json")
        atomic_write(path, lambda f: json.dump(coco, f))  # the json last: its presence means "complete"
        stats[split] = {"images": n, **buckets}
    return stats


# ---------------------------------------------------------------------------------------------------------
# COCO-format dataset with torchvision's detection contract.
# ---------------------------------------------------------------------------------------------------------
class DataError(ValueError):
    """A problem with the data on disk, in one line naming the file (train.py prints it without a traceback,
    also when it surfaces in the middle of training)."""


def read_annotations(path, image_dir):
    """A COCO instances file as a pycocotools COCO, checked before any training starts: every problem is a
    ValueError of one line naming the file (missing, not JSON, missing keys, duplicate ids, an annotation
    whose image or category is not listed, a bbox that is not 4 numbers, an RLE of another size than its
    image, image files missing). A missing 'area' is filled in from the bbox (COCOeval's size buckets)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise DataError(f"annotation file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file {path} is not valid JSON "
                        f"({str(e).splitlines()[0][:120]})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(d, dict) or k not in d]
    if missing:
        raise DataError(f"annotation file {path} lacks {', '.join(missing)}: a COCO instances file needs "
                         "'images', 'annotations' and 'categories'")
    for key, need in (("images", ("id", "file_name", "height", "width")),
                      ("annotations", ("id", "image_id", "category_id", "bbox")), ("categories", ("id",))):
        bad = next((x for x in d[key] if not isinstance(x, dict) or any(k not in x for k in need)), None)
        if bad is not None:
            raise DataError(f"annotation file {path}: an entry of '{key}' lacks one of {list(need)}: "
                            f"{str(bad)[:80]}")
        dup = next((i for i, n in collections.Counter(x["id"] for x in d[key]).items() if n > 1), None)
        if dup is not None:
            raise DataError(f"annotation file {path}: id {dup} appears more than once in '{key}'")
    images, cats = {im["id"]: im for im in d["images"]}, {c["id"] for c in d["categories"]}
    for a in d["annotations"]:
        problem = _ann_problem(a, images, cats)
        if problem:
            raise DataError(f"annotation file {path}: annotation {a['id']}: {problem}")
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    absent = [im["file_name"] for im in d["images"]
              if not os.path.isfile(os.path.join(image_dir, im["file_name"]))]
    if absent:
        raise DataError(f"{len(absent)} image(s) listed in {path} are missing from {image_dir}, "
                        f"e.g. {absent[0]}")
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _ann_problem(a, images, cats):
    """What keeps annotation `a` from use, given the file's {image id: image} and category ids; or None."""
    b, s, image = a["bbox"], a.get("segmentation", []), images.get(a["image_id"])
    if image is None or a["category_id"] not in cats:
        return (f"image_id {a['image_id']} is not in 'images'" if image is None else
                f"category_id {a['category_id']} is not in 'categories'")
    if not (isinstance(b, list) and len(b) == 4 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)):
        return f"bbox {str(b)[:60]} is not 4 numbers [x, y, w, h]"
    if isinstance(s, list):
        return None if all(isinstance(p, list) for p in s) else "segmentation is not a list of polygons"
    if not isinstance(s, dict) or "counts" not in s or "size" not in s:
        return "segmentation is neither polygons nor an RLE {counts, size}"
    hw = [image["height"], image["width"]]
    return None if s["size"] == hw else f"RLE size {s['size']} is not its image's [height, width] {hw}"


def ann_mask(segm, h, w):
    """[h, w] uint8 mask of a COCO segmentation: polygons (one object may have several parts), or an RLE with
    counts compressed (a string) or not (a list of run lengths, column-major, starting with zeros)."""
    if isinstance(segm, list):
        # a "polygon" of fewer than 3 points has no area (and pycocotools would read 4 numbers as a box)
        parts = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
        if not parts:
            return np.zeros((h, w), np.uint8)
        segm = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
    elif isinstance(segm["counts"], list):
        segm = mask_utils.frPyObjects(segm, h, w)
    return mask_utils.decode(segm)


def load_image(path):
    """[3, H, W] float in 0-1 from an image file of any common mode. 8-bit modes (grey 'L', palette 'P',
    'RGBA', 'CMYK', ...) go through PIL's convert('RGB'); 16-bit grey ('I;16', or 'I' as some Pillow
    versions open 16-bit PNGs) is scaled by 1/65535, because convert() would clip it at 255 (white)."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):
                grey = np.asarray(img, np.float32) / 65535  # [H, W]
                return torch.from_numpy(grey).clamp_(0, 1)[None].repeat(3, 1, 1)
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float().div_(255)
    except OSError as e:  # PIL's UnidentifiedImageError is one
        raise DataError(f"cannot read image {path}: {e}") from None


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets from a COCO-format folder.

    Returns (image [3, H, W] float in 0-1, target) with target = {boxes [N, 4] xyxy float, labels [N] int64
    in 1..K (contiguous, mapped from the sorted category ids), masks [N, H, W] uint8, image_id int,
    flipped bool}; an image without annotations has boxes [0, 4], labels [0], masks [0, H, W].
    `flip`: horizontal-flip augmentation with probability 0.5 (training). `masks=False` skips rasterising.
    """

    def __init__(self, root, split, flip=False, masks=True):
        self.root, self.split, self.flip, self.masks = root, split, flip, masks
        self.augmentations = ("hflip",) if flip else ()  # what engine.teacher_cache checks before caching
        path = os.path.join(root, "annotations", f"instances_{split}2017.json")
        self.coco = read_annotations(path, os.path.join(root, f"{split}2017"))
        self.ids = sorted(self.coco.imgs)
        self.category_ids = sorted(self.coco.cats)  # label i (1..K) <-> category_ids[i - 1]
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.category_ids)}
        # The targets. Crowd regions stay out of them (COCOeval still reads them from self.coco, as regions
        # where detections are ignored). Boxes are clipped to the image; those then under 1 px wide or high
        # are dropped with their masks: torchvision asserts on degenerate boxes in training.
        self.instances, dropped = {}, 0  # image_id -> [(xyxy box, annotation)]
        for i in self.ids:
            w, h = self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]
            self.instances[i] = []
            for a in self.coco.imgToAnns.get(i, []):
                if a.get("iscrowd", 0):
                    continue
                x, y, bw, bh = a["bbox"]
                box = [min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)]
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    dropped += 1
                    continue
                if masks and "segmentation" not in a:
                    raise DataError(f"annotation file {path}: annotation {a['id']} has no 'segmentation'; "
                                     "a mask model needs instance masks")
                self.instances[i].append((box, a))
        if dropped:  # once per dataset, not per item
            print(f"{path}: dropped {dropped} degenerate boxes "
                  "(width or height < 1 px after clipping to the image)")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        return self.load(idx, self.flip and torch.rand(1).item() < 0.5)

    def load(self, idx, flip=False):
        """Item `idx`, horizontally flipped or not (the target records which, as `flipped`: the cache of a
        teacher's features is keyed by (image_id, flipped))."""
        image_id = self.ids[idx]
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        file = os.path.join(self.root, f"{self.split}2017", info["file_name"])
        image = load_image(file)  # [3, H, W]
        if image.shape[1:] != (h, w):
            raise DataError(f"image {file} is {image.shape[2]}x{image.shape[1]} px, its annotation says "
                            f"{w}x{h}")
        kept = self.instances[image_id]
        boxes = torch.tensor([b for b, _ in kept], dtype=torch.float32).reshape(-1, 4)
        labels = [self.cat_to_label[a["category_id"]] for _, a in kept]
        target = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64),
                  "image_id": image_id, "flipped": flip}
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
        """(H, W) when every image has that size, else None: then every batch is padded alike."""
        sizes = {(im["height"], im["width"]) for im in self.coco.imgs.values()}
        return sizes.pop() if len(sizes) == 1 else None


def collate(batch):
    """A batch stays a pair of lists: torchvision detectors take images of different sizes."""
    return tuple(zip(*batch))


# ---------------------------------------------------------------------------------------------------------
# COCO evaluation.
# ---------------------------------------------------------------------------------------------------------
SUMMARY_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


@torch.no_grad()
def predict(model, loader, category_ids, device, progress=False, precision="fp32"):
    """Run `model` (eval mode) over `loader`; return COCO-format results lists for bbox and segm
    (segm empty when the model predicts no masks), with labels mapped back to the original category ids.
    precision: 'fp32', or 'bf16' / 'fp16' for the forward under that autocast (the anchors, boxes and
    scores stay float32: models.py)."""
    from tqdm import tqdm
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
                    rle["counts"] = rle["counts"].decode("ascii")
                    segm.append({**det, "segmentation": rle})
    return bbox, segm


def coco_summary(coco_gt, results, iou_type, text=False):
    """COCOeval's 12 summary numbers as a dict (SUMMARY_KEYS), and with text=True also the 12 lines that
    summarize() prints: (dict, text). No results score 0 (-1 where the data has no object of a size)."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if results:
            dt = coco_gt.loadRes([dict(r) for r in results])  # copies: loadRes adds keys to its input
        else:  # loadRes refuses an empty list
            dt = COCO()
            dt.dataset = {**coco_gt.dataset, "annotations": []}
            dt.createIndex()
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        ev.summarize()
    stats = {k: float(v) for k, v in zip(SUMMARY_KEYS, ev.stats)}
    return (stats, out.getvalue().rstrip("\n")) if text else stats


def score(coco_gt, bbox, segm=()):
    """Box AP (and mask AP when there are mask results) of COCO-format results against `coco_gt`.

    Returns {AP, AP50, AP75, APs, APm, APl, AR...} for bbox, plus the same with a 'mask_' prefix for segm.
    """
    out = coco_summary(coco_gt, bbox, "bbox")
    if segm:
        out.update({f"mask_{k}": v for k, v in coco_summary(coco_gt, segm, "segm").items()})
    return out


def write_results(path, results):
    """COCO results-format JSON (a list of {image_id, category_id, bbox or segmentation, score}), written
    with atomic_write (a crash leaves no half-written file)."""
    atomic_write(path, lambda f: json.dump(results, f))


@torch.no_grad()
def latency(model, loader, device, warmup=3, n=20, precision="fp32"):
    """Median milliseconds per image of single-image forward passes (eval mode, no grad, under the
    precision's autocast) over the images of loader.dataset (cycled if fewer than warmup + n), after
    `warmup` untimed passes. Loading is not timed; on CUDA the clock waits for the GPU (synchronize)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # CUDA runs asynchronously
    model.eval()
    ds, times = loader.dataset, []
    for i in range(warmup + n):
        image = ds[i % len(ds)][0].to(device)
        sync()
        start = time.perf_counter()
        with autocast(device, precision):
            model([image])
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[warmup:])
