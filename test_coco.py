"""Real COCO annotation files, in miniature: a COCO-format folder on disk with the quirks of the real thing
(multi-part polygons, compressed and uncompressed RLE, crowd regions, category ids with gaps, images
without annotations, grey / RGBA / palette / 16-bit images, degenerate boxes, broken files)."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import data
import engine
from conftest import tiny_detector

H, W = 64, 80  # not square, so that a swapped [h, w] shows
CATS = [90, 3, 17]  # with gaps, listed unsorted: labels 1, 2, 3 <-> ids 3, 17, 90


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


def ann(i, image, cat, segm=None, bbox=None, crowd=0, area=True):
    if bbox is None:
        bbox = poly_box(segm) if isinstance(segm, list) else mask_utils.toBbox(
            mask_utils.frPyObjects(segm, H, W) if isinstance(segm["counts"], list) else segm).tolist()
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
    ann(5, 11, 3, {"size": [H, W], "counts": rle_counts(MASKS["crowd"])}, crowd=1),
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


def write_coco(root):
    rng = np.random.default_rng(0)
    for split, images, anns in (("train", TRAIN_IMAGES, TRAIN_ANNS), ("val", VAL_IMAGES, VAL_ANNS)):
        os.makedirs(os.path.join(root, f"{split}2017"))
        for _, name, mode in images:
            rgb = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            rgb.convert(mode).save(os.path.join(root, f"{split}2017", name))
        d = {"images": [{"id": i, "file_name": n, "height": H, "width": W} for i, n, _ in images],
             "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in CATS]}
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        json.dump(d, open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w"))
    return root


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    return write_coco(str(tmp_path_factory.mktemp("quirky")))


def ann_path(root, split="train"):
    return os.path.join(root, "annotations", f"instances_{split}2017.json")


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
def test_items_have_clipped_xyxy_boxes_contiguous_labels_and_exact_masks(quirky):
    ds = data.CocoDetection(quirky, "train")
    assert ds.category_ids == [3, 17, 90] and ds.cat_to_label == {3: 1, 17: 2, 90: 3}
    items = {ds.ids[i]: ds[i][1] for i in range(len(ds))}
    t = items[10]  # polygon in two parts, compressed RLE, a box past the border; a degenerate one dropped
    assert t["labels"].tolist() == [1, 2, 3]
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
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["masks"].dtype == torch.uint8


def test_degenerate_boxes_are_reported_once_per_dataset(quirky, capsys):
    ds = data.CocoDetection(quirky, "train")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "dropped 3 degenerate boxes" in out and ann_path(quirky) in out
    for i in range(len(ds)):
        boxes = ds[i][1]["boxes"]
        assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()
    assert capsys.readouterr().out == ""  # nothing per item
    data.CocoDetection(quirky, "val")
    assert capsys.readouterr().out == ""  # nothing to report


@pytest.mark.parametrize("name", [n for _, n, _ in TRAIN_IMAGES])
def test_every_image_mode_loads_as_rgb(quirky, name):
    path = os.path.join(quirky, "train2017", name)
    image = data.load_image(path)
    want = np.asarray(Image.open(path).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert np.allclose(image.numpy(), want) and 0 <= image.min() and image.max() <= 1


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = np.linspace(0, 65535, H * W).round().reshape(H, W).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")) == 255).mean() > 0.9  # PIL clips
    image = data.load_image(str(tmp_path / "g16.png"))
    assert image.shape == (3, H, W) and torch.equal(image[0], image[2])
    assert torch.allclose(image[0], torch.from_numpy(grey / 65535).float())
    assert image.min() == 0 and image.max() == 1 and 0.49 < image.mean() < 0.51


def test_image_of_another_size_than_annotated_fails_in_one_line(quirky, tmp_path):
    root = shutil.copytree(quirky, tmp_path / "c")
    d = json.load(open(ann_path(root)))
    d["images"][3]["width"] = W + 1  # t_pal.png: no annotations, so only the image disagrees
    json.dump(d, open(ann_path(root), "w"))
    ds = data.CocoDetection(str(root), "train")
    with pytest.raises(ValueError, match=f"t_pal.png is {W}x{H} px, its annotation says {W + 1}x{H}"):
        ds[3]


def _drop(key):
    return lambda d: d.pop(key)


def _set(where, i, key, value):
    def edit(d):
        d[where][i][key] = value
    return edit


BROKEN = {
    "missing file": (None, "does not exist"),
    "not json": ("{oops", "is not valid JSON"),
    "no categories": (_drop("categories"), "lacks categories"),
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
    with pytest.raises(ValueError, match=match) as e:
        data.CocoDetection(root, "train")
    assert path in str(e.value) and "\n" not in str(e.value)


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
@pytest.mark.parametrize("name", ["retinanet_r18", "maskrcnn_r18"])
def test_evaluate_and_results_file_keep_the_original_category_ids(quirky, tmp_path, name):
    ds = data.CocoDetection(quirky, "val", masks=False)
    loader = torch.utils.data.DataLoader(ds, 2, collate_fn=data.collate)
    torch.manual_seed(0)
    model = tiny_detector(name, num_classes=4)
    if name.startswith("retinanet"):
        model.score_thresh = 0.0  # an untrained RetinaNet scores everything ~0.01: keep some detections
        model.detections_per_img = 20
    else:
        model.roi_heads.detections_per_img = 5  # its mask head is the slow part on a CPU
    metrics = engine.evaluate(model, loader, torch.device("cpu"))
    assert 0 <= metrics["AP"] <= 1 and 0 <= metrics["AP50"] <= 1
    assert ("mask_AP" in metrics) == name.startswith("maskrcnn")
    two = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, 1]), 2, collate_fn=data.collate)
    bbox, segm = data.predict(model, two, ds.category_ids, "cpu")
    for kind, res in (("bbox", bbox), ("segm", segm)):
        data.write_results(str(tmp_path / "out" / f"detections_{kind}.json"), res)
        back = json.load(open(tmp_path / "out" / f"detections_{kind}.json"))
        assert back == res and set(os.listdir(tmp_path / "out")) >= {f"detections_{kind}.json"}
        assert {d["category_id"] for d in back} <= {3, 17, 90} and (back or kind == "segm")
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "out"))
    assert data.latency(model, two, "cpu", warmup=1, n=1) > 0


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


def _oracle_scores(ds, extra=None):
    """Box and mask summaries of the ground truth as detections (score 0.9), plus `extra` {image_id: det}."""
    outputs = []
    for i in range(len(ds)):
        _, t = ds[i]
        out = _det(t["boxes"], t["labels"], t["masks"].numpy(), 0.9)
        if extra and t["image_id"] in extra:
            out = {k: torch.cat([out[k], extra[t["image_id"]][k]]) for k in out}
        outputs.append(out)
    loader = torch.utils.data.DataLoader(ds, 2, collate_fn=data.collate)
    bbox, segm = data.predict(Oracle(outputs), loader, ds.category_ids, "cpu")
    return bbox, data.coco_summary(ds.coco, bbox, "bbox"), data.coco_summary(ds.coco, segm, "segm")


def test_ground_truth_scores_1_and_a_detection_on_a_crowd_region_is_no_false_positive(quirky):
    ds = data.CocoDetection(quirky, "val")
    bbox, box_ap, mask_ap = _oracle_scores(ds)
    gt = {(a["image_id"], a["category_id"]) for a in VAL_ANNS if not a["iscrowd"]}
    assert {(d["image_id"], d["category_id"]) for d in bbox} == gt  # labels back to the ids 3, 17, 90
    assert box_ap["AP"] == pytest.approx(1.0) and mask_ap["AP"] == pytest.approx(1.0)
    crowd = VAL_ANNS[1]  # image 1, category 17 (label 2): an extra detection on it, scored above the rest
    x, y, w, h = crowd["bbox"]
    on_crowd = _det([[x, y, x + w, y + h]], [2], MASKS["vcrowd"][None], 1.0)
    _, box_ap, mask_ap = _oracle_scores(ds, {1: on_crowd})
    assert box_ap["AP"] == pytest.approx(1.0) and mask_ap["AP"] == pytest.approx(1.0)
    _, box_ap, mask_ap = _oracle_scores(ds, {3: on_crowd})  # the same on an image without objects: an FP
    assert box_ap["AP"] < 0.9 and mask_ap["AP"] < 0.9


def test_summary_text_is_cocoevals_12_lines_and_no_results_score_0(quirky):
    coco = data.CocoDetection(quirky, "val", masks=False).coco
    stats, text = data.coco_summary(coco, [], "bbox", text=True)
    lines = text.splitlines()
    assert len(lines) == 12 and lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")
    assert stats["AP"] == 0 and stats == data.coco_summary(coco, [], "bbox")


def test_eval_prints_cocoeval_summary_writes_detections_and_latency(quirky, tmp_path, capsys):
    import engine
    import train
    spec = engine.make_spec("r18", "retinanet_r18", 1.0, 64, [3, 17, 90], fpn_channels=16, head_convs=1)
    model = engine.build(spec, seed=0)
    model.head.classification_head.cls_logits.bias.data.fill_(0.0)  # scores ~0.5: some detections
    engine.save_ckpt(str(tmp_path / "r18.pt"), model, spec, {})
    train.main(["eval", "--ckpt", str(tmp_path / "r18.pt"), "--data", quirky, "--out", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith(" Average ")]) == 12
    assert "latency:" in out and "ms/image" in out
    dets = json.load(open(tmp_path / "ev" / "detections_bbox.json"))
    assert dets and {d["category_id"] for d in dets} <= {3, 17, 90}
    assert os.listdir(tmp_path / "ev") == ["detections_bbox.json"]


# ---------------------------------------------------------------------------------------------------------
# Sizes and anchors on real data: torchvision's recipe, not the built-in benchmark's
# ---------------------------------------------------------------------------------------------------------
def write_vga(root, n_train=2, n_val=1):
    """A COCO-format folder of 640x480 images (COCO's typical size), one box each, category ids 3 and 17."""
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(os.path.join(root, f"{split}2017"))
        images = [{"id": i + 1, "file_name": f"{i}.jpg", "height": 480, "width": 640} for i in range(n)]
        for im in images:
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(
                os.path.join(root, f"{split}2017", im["file_name"]))
        anns = [ann(i + 1, i + 1, 3 if i % 2 else 17, [[100, 100, 300, 100, 300, 250, 100, 250]])
                for i in range(n)]
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 3}, {"id": 17}]},
                  open(ann_path(root, split), "w"))
    return root


@pytest.fixture(scope="module")
def vga(tmp_path_factory):
    return write_vga(str(tmp_path_factory.mktemp("vga")))


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


@pytest.mark.parametrize("name,builder,weights", [
    ("retinanet_r50", "retinanet_resnet50_fpn", "RetinaNet_ResNet50_FPN_Weights.COCO_V1"),
    ("fcos_r50", "fcos_resnet50_fpn", "FCOS_ResNet50_FPN_Weights.COCO_V1"),
    ("fasterrcnn_r50", "fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"),
    ("maskrcnn_r50", "maskrcnn_resnet50_fpn", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1")])
def test_train_on_coco_data_with_torchvision_weights_builds_torchvisions_model(vga, name, builder, weights):
    """`train --model NAME --weights ...COCO_V1 --data <640x480 images>` builds the model with the transform
    sizes, anchor generator and proposal settings of torchvision's builder (which those weights were trained
    with), not the built-in benchmark's (min size = the images' height, anchors from size / 8)."""
    import argparse

    import torchvision

    import engine
    import train
    ds = data.CocoDetection(vga, "train", masks=False)
    with torch.device("meta"):  # the modules' settings without allocating (or initialising) their weights
        want = recipe_of(torchvision.models.get_model(builder, weights=None, weights_backbone=None,
                                                      num_classes=3))
    for weights_flag in (weights, None):  # with the weights, and on --data alone
        args = argparse.Namespace(weights=weights_flag, data=vga, min_size=0, max_size=0, anchor_base=0)
        sizes = train.input_sizes(args, ds)
        spec = engine.make_spec("m", name, 1.0, sizes["min_size"], ds.category_ids,
                                max_size=sizes["max_size"], anchor_base=sizes["anchor_base"],
                                pretrained=weights_flag is not None)
        with torch.device("meta"):
            assert recipe_of(engine.build(spec)) == want
    args = argparse.Namespace(weights=None, data=None, min_size=0, max_size=0, anchor_base=0)
    # built-in rule
    assert train.input_sizes(args, ds) == {"min_size": 480, "max_size": 480, "anchor_base": 60}


def test_train_refuses_sizes_that_contradict_torchvision_weights(vga, tmp_path, capsys):
    """A size flag that contradicts torchvision weights is one line, exit code 2, before anything is
    written."""
    from conftest import cli
    code, err = cli(capsys, "train", "--model", "retinanet_r50",
                    "--weights", "RetinaNet_ResNet50_FPN_Weights.COCO_V1",
                    "--data", vga, "--min-size", "512", "--out", tmp_path / "no")
    assert code == 2 and err.count("\n") == 1 and "--min-size 512 conflicts with" in err and "800" in err
    assert not (tmp_path / "no").exists()
