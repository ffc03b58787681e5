"""data.py on data with the quirks of real COCO files, and the command line on real-looking data.

A COCO-format folder written by hand ("quirky": multi-part polygons, compressed and uncompressed RLE, crowd
regions, category ids with gaps, images without annotations, grey / RGBA / palette / 16-bit images,
degenerate boxes, broken files); the built-in shapes benchmark at COCO's mixed aspect ratios; COCO
evaluation; `train.py eval`, and `train.py train` with torchvision's weights and COCO's image sizes.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils

import data
import engine
import models
import train
from conftest import cli, tiny_detector

H, W = 64, 80  # not square, so that a swapped [h, w] shows
CATS = [90, 3, 17]  # with gaps, listed unsorted: labels 1, 2, 3 <-> ids 3, 17, 90
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many tiny ops: one thread is much faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rle_counts(m):
    """Uncompressed RLE counts of mask m, by hand: column-major run lengths, starting with a run of zeros."""
    flat = np.asarray(m, np.uint8).flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    return ([0] if flat[0] else []) + np.diff(bounds).tolist()


def compressed(m):
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def blob(x0, y0, x1, y1):
    """A filled ellipse in the box [x0, x1) x [y0, y1), [H, W] uint8."""
    yy, xx = np.mgrid[0:H, 0:W]
    cx, cy, rx, ry = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)


def poly_box(p):
    xs, ys = [c for q in p for c in q[0::2]], [c for q in p for c in q[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


MASKS = {"c": blob(40, 8, 70, 30), "u": blob(10, 20, 50, 60), "crowd": blob(20, 5, 70, 40),
         "vc": blob(5, 5, 40, 30), "vu": blob(45, 30, 78, 62), "vcrowd": blob(40, 20, 78, 60)}
POLY2 = [[5, 5, 20, 5, 20, 20, 5, 20], [25, 30, 40, 30, 40, 45]]  # one object in two parts
POLY = [[10, 10, 60, 12, 30, 50]]


def ann(i, image, cat, segm=None, bbox=None, crowd=0, area=True, h=H, w=W):
    if bbox is None:
        bbox = poly_box(segm) if isinstance(segm, list) else mask_utils.toBbox(
            mask_utils.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm).tolist()
    a = {"id": i, "image_id": image, "category_id": cat, "bbox": bbox, "iscrowd": crowd}
    if segm is not None:
        a["segmentation"] = segm
    if area:
        a["area"] = bbox[2] * bbox[3]
    return a


TRAIN_IMAGES = [(10, "t_rgb.png", "RGB"), (11, "t_grey.png", "L"), (12, "t_rgba.png", "RGBA"),
                (13, "t_pal.png", "P")]  # 13 has no annotations
TRAIN_ANNS = [
    ann(1, 10, 3, POLY2),
    ann(2, 10, 17, compressed(MASKS["c"])),
    ann(3, 10, 90, [[50, 40, 80, 40, 80, 50, 50, 50]], bbox=[50, 40, 30, 10]),  # 14 px past the border
    ann(4, 11, 90, {"size": [H, W], "counts": rle_counts(MASKS["u"])}),
    ann(5, 11, 3, {"size": [H, W], "counts": rle_counts(MASKS["crowd"])}, crowd=1),  # as COCO stores crowds
    ann(6, 12, 17, POLY),
    ann(7, 12, 3, [[10, 10, 10.5, 10, 10.5, 30]], bbox=[10, 10, 0.5, 20]),  # degenerate: 0.5 px wide
    ann(8, 12, 3, [], bbox=[10, 10, 5, -3]),  # degenerate: negative height
    ann(9, 10, 17, [], bbox=[90, 10, 5, 5]),  # degenerate: outside the image
]
VAL_IMAGES = [(1, "v_grey.png", "L"), (2, "v_rgba.png", "RGBA"), (3, "v_pal.png", "P")]  # 3: no annotations
VAL_ANNS = [
    ann(101, 1, 3, POLY2),
    ann(102, 1, 17, {"size": [H, W], "counts": rle_counts(MASKS["vcrowd"])}, crowd=1),
    ann(103, 2, 90, compressed(MASKS["vc"])),
    ann(104, 2, 17, {"size": [H, W], "counts": rle_counts(MASKS["vu"])}, area=False),  # area filled in
]


def ann_path(root, split="train"):
    return os.path.join(root, "annotations", f"instances_{split}2017.json")


def write_coco(root, splits, h, w, categories, seed=0, ext="png"):
    """splits: {split: ([(image id, file name, PIL mode)], [annotation])} -> a COCO-format folder."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, (images, anns) in splits.items():
        os.makedirs(os.path.join(root, f"{split}2017"))
        for _, name, mode in images:
            rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            rgb.convert(mode).save(os.path.join(root, f"{split}2017", name))
        d = {"images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, _ in images],
             "annotations": anns, "categories": categories}
        json.dump(d, open(ann_path(root, split), "w"))
    return root


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    return write_coco(str(tmp_path_factory.mktemp("quirky")),
                      {"train": (TRAIN_IMAGES, TRAIN_ANNS), "val": (VAL_IMAGES, VAL_ANNS)}, H, W,
                      [{"id": c, "name": f"c{c}"} for c in CATS])


# COCO's aspect ratios (4:3, 3:4, 3:2) at a short side of 64 px, mixed in every batch
SIZES = [(64, 85), (85, 64), (64, 96)]


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco_like"))
    return root, data.make_shapes(root, n_train=8, n_val=6, seed=4, progress=False, sizes=SIZES)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
def test_items_have_clipped_xyxy_boxes_contiguous_labels_exact_masks_and_no_crowds(quirky, capsys):
    ds = data.CocoDetection(quirky, "train")
    out = capsys.readouterr().out  # degenerate boxes: one line per dataset, naming the file
    assert out.count("\n") == 1 and "dropped 3 degenerate boxes" in out and ann_path(quirky) in out
    assert ds.category_ids == [3, 17, 90] and ds.cat_to_label == {3: 1, 17: 2, 90: 3}
    assert ds.one_size() is True
    items = {ds.ids[i]: ds[i][1] for i in range(len(ds))}
    assert capsys.readouterr().out == ""  # nothing per item
    for t in items.values():
        assert (t["boxes"][:, 2:] - t["boxes"][:, :2] >= 1).all()
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert t["masks"].dtype == torch.uint8 and len(t["masks"]) == len(t["boxes"]) == len(t["labels"])
    t = items[10]  # polygon in two parts, compressed RLE, a box past the border; a degenerate one dropped
    assert t["labels"].tolist() == [1, 2, 3] and t["image_id"] == 10
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(MASKS["c"]))).tolist()
    assert torch.allclose(t["boxes"], torch.tensor([[5, 5, 40, 45], [x, y, x + w, y + h], [50, 40, W, 50]],
                                                   dtype=torch.float32))
    merged = mask_utils.merge(mask_utils.frPyObjects(POLY2, H, W))
    assert t["masks"][0].sum().item() == mask_utils.area(merged)  # both parts
    shoelace = sum(0.5 * abs(sum(p[i] * p[(i + 3) % len(p)] - p[(i + 2) % len(p)] * p[i + 1]
                                 for i in range(0, len(p), 2))) for p in POLY2)
    assert abs(t["masks"][0].sum().item() - shoelace) < 0.15 * shoelace
    assert np.array_equal(t["masks"][1].numpy(), MASKS["c"])
    t = items[11]  # uncompressed RLE, and a crowd region that stays out of the targets
    assert t["labels"].tolist() == [3] and np.array_equal(t["masks"][0].numpy(), MASKS["u"])
    t = items[12]  # a polygon; two degenerate boxes dropped with their masks
    assert t["labels"].tolist() == [2] and t["masks"].shape == (1, H, W)
    t = items[13]  # no annotations
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, H, W)
    image, t = ds.load(0, flip=True)  # the flip mirrors image, boxes and masks alike
    assert t["flipped"] and torch.equal(image, ds.load(0)[0].flip(-1))
    assert torch.allclose(t["boxes"][0], torch.tensor([W - 40.0, 5, W - 5, 45]))
    assert np.array_equal(t["masks"][1].numpy(), MASKS["c"][:, ::-1])
    data.CocoDetection(quirky, "val")
    assert capsys.readouterr().out == ""  # nothing to report: crowds are not degenerate boxes


def test_every_image_mode_loads_as_rgb_and_16_bit_grey_is_scaled_not_clipped(quirky, tmp_path):
    for _, name, _ in TRAIN_IMAGES:  # RGB, L, RGBA, P
        path = os.path.join(quirky, "train2017", name)
        image = data.load_image(path)
        want = np.asarray(Image.open(path).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
        assert image.shape == (3, H, W) and image.dtype == torch.float32, name
        assert np.allclose(image.numpy(), want) and 0 <= image.min() and image.max() <= 1, name
    grey = np.linspace(0, 65535, H * W).round().reshape(H, W).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")) == 255).mean() > 0.9  # PIL clips
    image = data.load_image(str(tmp_path / "g16.png"))
    assert image.shape == (3, H, W) and torch.equal(image[0], image[2])
    assert torch.allclose(image[0], torch.from_numpy(grey / 65535).float())
    assert image.min() == 0 and image.max() == 1 and 0.49 < image.mean() < 0.51
    (tmp_path / "broken.png").write_text("not a png")
    with pytest.raises(data.InputError, match="cannot read image .*broken.png") as e:
        data.load_image(str(tmp_path / "broken.png"))
    assert "\n" not in str(e.value)


def _set(where, i, key, value):
    def edit(d):
        d[where][i][key] = value
    return edit


BROKEN = {
    "missing file": (None, "does not exist"),
    "not json": ("{oops", "is not valid JSON"),
    "no categories": (lambda d: d.pop("categories"), "lacks 'categories'"),
    "image without height": (lambda d: d["images"][0].pop("height"), "an entry of 'images' lacks one of"),
    "annotation without id": (lambda d: d["annotations"][0].pop("id"), "an entry of 'annotations' lacks"),
    "unknown category": (_set("annotations", 0, "category_id", 5), "annotation 1: category_id 5 is not in"),
    "unknown image": (_set("annotations", 1, "image_id", 999),
                      "annotation 2: image_id 999 is not in 'images'"),
    "bbox of 3": (_set("annotations", 0, "bbox", [1, 2, 3]), r"bbox \[1, 2, 3\] is not 4 numbers"),
    "bbox of text": (_set("annotations", 0, "bbox", ["1", 2, 3, 4]), "is not 4 numbers"),
    "bbox with NaN": (_set("annotations", 0, "bbox", [math.nan, 2, 3, 4]), "is not 4 numbers"),
    "duplicate id": (_set("annotations", 1, "id", 1), "id 1 appears more than once in 'annotations'"),
    "RLE of other size": (lambda d: d["annotations"][3]["segmentation"].update(size=[W, H]),
                          rf"annotation 4: RLE size \[{W}, {H}\] is not its image's"),
    "bad segmentation": (_set("annotations", 0, "segmentation", {"counts": "x"}),
                         "neither polygons nor an RLE"),
    "image missing": ("rm", r"1 image\(s\) listed in .* are missing from .*, e.g. t_pal.png"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_annotation_file_problems_fail_in_one_line_naming_the_file(quirky, tmp_path, case):
    edit, match = BROKEN[case]
    root = str(shutil.copytree(quirky, tmp_path / "c"))
    path = ann_path(root)
    if edit is None:
        os.remove(path)
    elif edit == "rm":
        os.remove(os.path.join(root, "train2017", "t_pal.png"))
    elif isinstance(edit, str):
        open(path, "w").write(edit)
    else:
        d = json.load(open(path))
        edit(d)
        json.dump(d, open(path, "w"))
    with pytest.raises(data.InputError, match=match) as e:
        data.CocoDetection(root, "train")
    assert path in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_image_of_another_size_than_annotated_and_mask_model_without_masks_fail_in_one_line(quirky, tmp_path):
    root = str(shutil.copytree(quirky, tmp_path / "c"))
    d = json.load(open(ann_path(root)))
    d["images"][3]["width"] = W + 1  # t_pal.png: no annotations, so only the image disagrees
    d["annotations"][5].pop("segmentation")  # annotation 6: a box without a mask
    json.dump(d, open(ann_path(root), "w"))
    ds = data.CocoDetection(root, "train", masks=False)  # a box model needs no masks
    with pytest.raises(data.InputError, match=f"t_pal.png is {W}x{H} px, its annotation says {W + 1}x{H}"):
        ds[3]
    with pytest.raises(data.InputError, match="annotation 6 has no 'segmentation'; a mask model") as e:
        data.CocoDetection(root, "train")
    assert "\n" not in str(e.value) and ann_path(root) in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# The built-in benchmark at COCO's aspect ratios
# ---------------------------------------------------------------------------------------------------------
def test_make_shapes_cycles_sizes_with_objects_inside_and_original_category_ids(coco_like, shapes):
    root, stats = coco_like
    for split, n in (("train", 8), ("val", 6)):
        d = json.load(open(ann_path(root, split)))
        images = {im["id"]: im for im in d["images"]}
        assert [(im["height"], im["width"]) for im in d["images"]] == [SIZES[i % 3] for i in range(n)]
        for im in d["images"]:
            with Image.open(os.path.join(root, f"{split}2017", im["file_name"])) as f:
                assert f.size == (im["width"], im["height"])
        assert {c["id"] for c in d["categories"]} == set(data.SHAPES.values())
        assert all(a["iscrowd"] == 0 for a in d["annotations"])
        for a in d["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= im["width"] + 0.01 and y + h <= im["height"] + 0.01
            assert 0 < a["area"] <= w * h + 0.01
        assert stats[split]["images"] == n
        assert stats[split]["small"] + stats[split]["medium"] + stats[split]["large"] == len(d["annotations"])
    assert all(stats[s]["small"] and stats[s]["medium"] for s in stats)  # COCO's small objects too
    ds = data.CocoDetection(root, "train")
    assert ds.one_size() is False and data.CocoDetection(shapes[0], "train").one_size() is True
    assert ds.category_ids == sorted(data.SHAPES.values())
    assert [tuple(ds[i][0].shape[1:]) for i in range(3)] == SIZES


def test_make_shapes_default_square_as_sizes_changes_nothing_and_bad_sizes_fail(tmp_path):
    kw = dict(n_train=3, n_val=2, size=64, seed=3, progress=False)
    data.make_shapes(str(tmp_path / "a"), **kw)
    data.make_shapes(str(tmp_path / "b"), **kw, sizes=[(64, 64)])
    for split in ("train", "val"):
        a, b = (json.load(open(ann_path(str(tmp_path / x), split))) for x in "ab")
        assert a == b and a["annotations"]
        for im in a["images"]:
            pa, pb = (np.asarray(Image.open(tmp_path / x / f"{split}2017" / im["file_name"])) for x in "ab")
            assert pa.shape == (64, 64, 3) and (pa == pb).all()
    for sizes, msg in (([(64,)], "sizes must be"), ([], "sizes must be"), ([(8, 64)], "at least 16")):
        with pytest.raises(ValueError, match=msg) as e:
            data.make_shapes(str(tmp_path / "c"), n_train=1, n_val=1, progress=False, sizes=sizes)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["retinanet_r18", "maskrcnn_r18"])
def test_one_training_step_on_quirky_batches_changes_weights(quirky, name):
    ds = data.CocoDetection(quirky, "train", flip=True, masks=name.startswith("maskrcnn"))
    torch.manual_seed(0)
    model = tiny_detector(name, num_classes=len(ds.category_ids) + 1).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    empty = [i for i in range(len(ds)) if len(ds[i][1]["boxes"]) == 0]
    assert empty == [3]
    for batch in (empty, [0, 1, 2]):  # only the image without annotations; then the others
        images, targets = data.collate([ds[i] for i in batch])
        before = [p.detach().clone() for p in model.parameters()]
        losses = model(list(images), list(targets))
        loss = sum(losses.values())
        assert torch.isfinite(loss), losses
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """A "detector" that returns given outputs, one per image, in loader order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def _det(boxes, labels, masks, score):
    return {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels), "scores": torch.full((len(labels),), score),
            "masks": torch.from_numpy(masks).float()[:, None]}


def _oracle(ds, extra=None):
    """The ground truth as detections (score 0.9), plus `extra` {image_id: det}: (bbox, segm, metrics)."""
    outputs = []
    for i in range(len(ds)):
        _, t = ds[i]
        out = _det(t["boxes"], t["labels"], t["masks"].numpy(), 0.9)
        if extra and t["image_id"] in extra:
            out = {k: torch.cat([out[k], extra[t["image_id"]][k]]) for k in out}
        outputs.append(out)
    loader = torch.utils.data.DataLoader(ds, 2, collate_fn=data.collate)
    bbox, segm = data.predict(Oracle(outputs), loader, ds.category_ids, "cpu")
    return bbox, segm, data.score(ds.coco, bbox, segm)


def test_coco_summary_ground_truth_scores_1_none_0_and_a_detection_on_a_crowd_region_is_ignored(quirky):
    ds = data.CocoDetection(quirky, "val")
    bbox, segm, metrics = _oracle(ds)
    gt = {(a["image_id"], a["category_id"]) for a in VAL_ANNS if not a["iscrowd"]}
    assert {(d["image_id"], d["category_id"]) for d in bbox} == gt  # labels back to the ids 3, 17, 90
    assert all(d["segmentation"]["size"] == [H, W] and isinstance(d["segmentation"]["counts"], str)
               for d in segm)
    assert set(metrics) == set(data.SUMMARY_KEYS) | {f"mask_{k}" for k in data.SUMMARY_KEYS}
    assert metrics["AP"] == pytest.approx(1.0) and metrics["mask_AP"] == pytest.approx(1.0)
    stats, text = data.coco_summary(ds.coco, bbox, "bbox")
    lines = text.splitlines()
    assert len(lines) == 12 and lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")
    assert lines[0].endswith(" = 1.000") and stats == {k: v for k, v in metrics.items() if "mask" not in k}
    stats, text = data.coco_summary(ds.coco, [], "bbox")  # no results: 0, not an error
    assert stats["AP"] == 0 and len(text.splitlines()) == 12 and data.score(ds.coco, [])["AP"] == 0
    crowd = VAL_ANNS[1]  # image 1, category 17 (label 2): an extra detection on it, scored above the rest
    x, y, w, h = crowd["bbox"]
    on_crowd = _det([[x, y, x + w, y + h]], [2], MASKS["vcrowd"][None], 1.0)
    bbox, _, metrics = _oracle(ds, {1: on_crowd})
    assert len(bbox) == len(gt) + 1
    assert metrics["AP"] == pytest.approx(1.0) and metrics["mask_AP"] == pytest.approx(1.0)
    _, _, metrics = _oracle(ds, {3: on_crowd})  # the same on an image without objects: a false positive
    assert metrics["AP"] < 0.9 and metrics["mask_AP"] < 0.9


def _quirky_ckpt(path, name):
    """A tiny checkpoint on the quirky categories whose untrained scores pass the score threshold."""
    spec = engine.make_spec(name, name, 1.0, 64, [3, 17, 90], fpn_channels=16, head_convs=1)
    model = engine.build(spec, seed=0)
    if name.startswith("retinanet"):
        model.head.classification_head.cls_logits.bias.data.fill_(0.0)  # scores ~0.5: some detections
    engine.save_ckpt(str(path), model, spec, {})
    return model


@pytest.mark.parametrize("name", ["retinanet_r18", "maskrcnn_r18"])
def test_eval_prints_cocoeval_summaries_and_writes_detections_of_the_original_ids(
        quirky, coco_like, tmp_path, capsys, monkeypatch, name):
    """`eval` prints COCOeval's 12 lines per kind (box; mask for Mask R-CNN), and writes the detections
    with the data's category ids; scored, they give engine.evaluate's metrics."""
    mask = name.startswith("maskrcnn")
    model = _quirky_ckpt(tmp_path / "m.pt", name)
    load = engine.load

    def few(*a, **k):  # an untrained Mask R-CNN's mask head on 100 detections per image is slow on a CPU
        out = load(*a, **k)
        if mask:
            out[0].roi_heads.detections_per_img = 5
        return out
    monkeypatch.setattr(engine, "load", few)
    train.main(["eval", "--ckpt", tmp_path / "m.pt", "--data", quirky, "--precision", "fp32",
                "--out", tmp_path / "ev"])
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith(" Average ")]) == 12 * (1 + mask)
    assert len([line for line in out.splitlines() if line.startswith(" Average Recall ")]) == 6 * (1 + mask)
    assert f"{name}: bbox," in out and (f"{name}: segm," in out) == mask
    kinds = ["bbox", "segm"] if mask else ["bbox"]
    assert sorted(os.listdir(tmp_path / "ev")) == [f"detections_{k}.json" for k in kinds]  # no .tmp left
    dets = {k: json.load(open(tmp_path / "ev" / f"detections_{k}.json")) for k in kinds}
    assert dets["bbox"] and {d["category_id"] for d in dets["bbox"]} <= {3, 17, 90}
    assert {d["image_id"] for d in dets["bbox"]} <= {1, 2, 3}
    val = data.CocoDetection(quirky, "val", masks=False)
    if mask:
        model.roi_heads.detections_per_img = 5
    loader = torch.utils.data.DataLoader(val, 2, collate_fn=data.collate)
    metrics = engine.evaluate(model, loader, CPU, "fp32")
    assert metrics == data.score(val.coco, dets["bbox"], dets.get("segm", ()))
    assert ("mask_AP" in metrics) == mask and 0 <= metrics["AP"] <= 1
    assert all(0 <= v <= 1 or v == -1 for v in metrics.values())  # -1: no object of that size
    # a checkpoint of other categories than the data's: one line, exit code 2, nothing written
    code, err = cli(capsys, "eval", "--ckpt", tmp_path / "m.pt", "--data", coco_like[0],
                    "--out", tmp_path / "x")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "categories" in err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------
# `train` on real data: torchvision's sizes and anchors, not the built-in benchmark's
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vga(tmp_path_factory):
    """640x480 JPEGs (COCO's typical size), one box each; categories 3 and 17 named as in COCO."""
    anns = {s: [ann(i, i, 3 if i % 2 else 17, [[100, 100, 300, 100, 300, 250, 100, 250]], h=480, w=640)
                for i in ids] for s, ids in (("train", [1, 2]), ("val", [3]))}
    splits = {s: ([(a["image_id"], f"{a['image_id']}.jpg", "RGB") for a in anns[s]], anns[s]) for s in anns}
    return write_coco(str(tmp_path_factory.mktemp("vga")), splits, 480, 640,
                      [{"id": 3, "name": "car"}, {"id": 17, "name": "cat"}], seed=1)


def recipe_of(model):
    """What a detector's builder decides beyond its weights: input sizes, anchors, matching, proposals."""
    anchors = model.rpn.anchor_generator if hasattr(model, "rpn") else model.anchor_generator
    out = {"min_size": model.transform.min_size, "max_size": model.transform.max_size,
           "anchor_sizes": anchors.sizes, "aspect_ratios": anchors.aspect_ratios}
    if hasattr(model, "rpn"):
        out.update(pre_nms=model.rpn._pre_nms_top_n, post_nms=model.rpn._post_nms_top_n,
                   roi_batch=model.roi_heads.fg_bg_sampler.batch_size_per_image,
                   detections=model.roi_heads.detections_per_img, score=model.roi_heads.score_thresh)
    else:
        out.update(score=model.score_thresh, nms=model.nms_thresh, detections=model.detections_per_img,
                   topk=model.topk_candidates, radius=getattr(model, "center_sampling_radius", None))
    return out


TV = {"retinanet_r50": ("retinanet_resnet50_fpn", "RetinaNet_ResNet50_FPN_Weights.COCO_V1"),
      "fcos_r50": ("fcos_resnet50_fpn", "FCOS_ResNet50_FPN_Weights.COCO_V1"),
      "fasterrcnn_r50": ("fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"),
      "maskrcnn_r50": ("maskrcnn_resnet50_fpn", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1")}


def test_train_on_coco_data_builds_torchvisions_model_and_refuses_contradicting_sizes(
        vga, tmp_path, capsys, monkeypatch):
    """`train --model NAME [--weights ...COCO_V1] --data <640x480 images>` builds the model with the transform
    sizes, anchors and proposal settings of torchvision's builder (which those weights were trained with),
    not the built-in benchmark's (min size = the images' height, anchors from size / 8); COCO's weights keep
    the rows of the data's categories, whose names agree. Built on the meta device, training left out."""
    made, loaded = [], []
    build = engine.build

    def meta_build(spec, seed=None):
        with torch.device("meta"):
            return build(spec, seed)
    monkeypatch.setattr(engine, "build", meta_build)
    monkeypatch.setattr(train, "fit", lambda args, path, spec, net, *a: made.append((spec, net)))
    monkeypatch.setattr(models, "load_weights", lambda net, src, k, cats=None: loaded.append((src, k, cats))
                        or f"loaded {src}")
    for name, (builder, weights) in TV.items():
        with torch.device("meta"):  # the modules' settings without allocating (or initialising) their weights
            want = recipe_of(torchvision.models.get_model(builder, weights=None, weights_backbone=None,
                                                          num_classes=3))
        for flags in (["--weights", weights], []):  # with the weights, and on --data alone
            made.clear()
            train.main(["train", "--model", name, "--data", vga, *flags, "--out", tmp_path / "o"])
            (spec, net), = made
            assert recipe_of(net) == want, (name, flags)
            assert (spec["min_size"], spec["max_size"], spec["anchor_base"]) == (800, 1333, 32)
            assert spec["pretrained"] == (flags[1] if flags else False)  # the weights' name: their recipe
            assert spec["category_ids"] == [3, 17]
        assert loaded[-1] == (weights, 3, [3, 17])  # COCO's rows of "car" and "cat"
    assert "loaded MaskRCNN_ResNet50_FPN_Weights.COCO_V1" in capsys.readouterr().out
    made.clear()  # the built-in benchmark's rule: no --data, no --weights (here the same folder)
    monkeypatch.setattr(train, "data_root", lambda args, preset="default": vga)
    train.main(["train", "--model", "retinanet_r18", "--out", tmp_path / "o"])
    assert {k: made[0][0][k] for k in ("min_size", "max_size", "anchor_base")} == dict(
        min_size=480, max_size=480, anchor_base=60)
    # a size flag that contradicts torchvision's weights: one line, exit code 2, before anything is written
    code, err = cli(capsys, "train", "--model", "retinanet_r50", "--weights", TV["retinanet_r50"][1],
                    "--data", vga, "--min-size", "512", "--out", tmp_path / "no")
    assert code == 2 and err.count("\n") == 1 and "--min-size 512 conflicts with" in err and "800" in err
    assert not (tmp_path / "no").exists() and not (tmp_path / "o").exists()


def test_train_on_coco_data_without_torchvision_weights_honours_size_flags(vga, tmp_path, capsys):
    """Without torchvision's weights the size flags hold; --epochs 0 evaluates and saves the fresh model."""
    train.main(["train", "--model", "retinanet_r18", "--data", vga, "--min-size", 64, "--max-size", 96,
                "--anchor-base", 8, "--epochs", 0, "--precision", "fp32", "--out", tmp_path / "o"])
    assert "AP" in capsys.readouterr().out
    ck = torch.load(tmp_path / "o" / "model.pt", weights_only=True)
    assert {k: ck["spec"][k] for k in ("min_size", "max_size", "anchor_base", "pretrained")} == dict(
        min_size=64, max_size=96, anchor_base=8, pretrained=False)
    assert ck["metrics"]["made"]["steps"] == 0 and 0 <= ck["metrics"]["AP"] <= 1
    model = engine.load(str(tmp_path / "o" / "model.pt"))[0]
    assert model.transform.min_size == (64,) and model.anchor_generator.sizes[0] == (8, 10, 12)


# ---------------------------------------------------------------------------------------------------------
# End to end through the command line, float32 and bf16, on images of mixed sizes
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_and_eval_on_mixed_sizes_in_float32_and_bf16(coco_like, tmp_path, capsys):
    root, _ = coco_like
    val = data.CocoDetection(root, "val", masks=False)
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        train.main(["train", "--model", "retinanet_r18", "--data", root, "--min-size", 64, "--max-size", 96,
                    "--anchor-base", 8, "--epochs", 1, "--batch", 4, "--seed", 0, "--precision", precision,
                    "--out", out / "train"])
        log = capsys.readouterr().out
        assert f"precision {precision}" in log
        ck = torch.load(out / "train" / "model.pt", weights_only=True)
        assert ck["metrics"]["made"]["precision"] == precision and ck["metrics"]["made"]["steps"] == 2
        assert (ck["spec"]["min_size"], ck["spec"]["max_size"], ck["spec"]["anchor_base"]) == (64, 96, 8)
        assert ck["spec"]["category_ids"] == sorted(data.SHAPES.values())
        assert math.isfinite(ck["metrics"]["AP"]) and 0 <= ck["metrics"]["AP"] <= 1
        assert all(v.dtype != torch.bfloat16 for v in ck["model"].values())
        assert not (out / "train" / "model.state.pt").exists()
        records = [json.loads(line) for line in open(out / "train" / "log.jsonl")]
        assert [r["event"] for r in records] == ["step", "step", "eval"]
        assert all(math.isfinite(r["classification"] + r["bbox_regression"]) for r in records[:2])
        train.main(["eval", "--ckpt", out / "train" / "model.pt", "--data", root, "--precision", precision,
                    "--out", out / "eval"])
        log = capsys.readouterr().out
        assert len([line for line in log.splitlines() if line.startswith(" Average ")]) == 12
        assert os.listdir(out / "eval") == ["detections_bbox.json"]
        dets = json.load(open(out / "eval" / "detections_bbox.json"))
        assert {d["category_id"] for d in dets} <= set(data.SHAPES.values())
        assert {d["image_id"] for d in dets} <= set(val.ids)
        ap = data.score(val.coco, dets)["AP"]
        assert math.isfinite(ap) and 0 <= ap <= 1
        if precision == "fp32":  # the same model, data and precision: the AP training reported
            assert ap == pytest.approx(ck["metrics"]["AP"], abs=1e-9)
