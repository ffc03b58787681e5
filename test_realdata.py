"""The whole method on data shaped like COCO's, in miniature: images of COCO's aspect ratios (4:3, 3:4, 3:2,
mixed in every batch), many objects under 32^2 px, crowd regions, category ids with gaps (1, 2, 5, 8, 9);
through the command line in float32 and in bf16; and gpu_check.py's CPU run."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import box_convert, box_iou

import data
import engine
import gpu_check
import train

SIZES = [(96, 128), (128, 96), (96, 144)]  # (h, w): COCO's 4:3, 3:4 and 3:2 at a short side of 96 px
# torchvision's resizing at a small scale: the 3:2 images hit --max-size (96 x 144 -> 85 x 128)
SMALL = ["--min-size", "96", "--max-size", "128", "--anchor-base", "16", "--batch", "4"]


def annotations(root, split):
    return json.load(open(os.path.join(root, "annotations", f"instances_{split}2017.json")))


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco_like"))
    stats = data.make_shapes(root, n_train=12, n_val=8, seed=4, progress=False, sizes=SIZES, crowd=0.5)
    return root, stats


# ---------------------------------------------------------------------------------------------------------
# make_shapes' sizes and crowds
# ---------------------------------------------------------------------------------------------------------
def test_sizes_are_cycled_and_objects_stay_inside(coco_like):
    root, stats = coco_like
    for split, n in (("train", 12), ("val", 8)):
        d = annotations(root, split)
        images = {im["id"]: im for im in d["images"]}
        assert [(im["height"], im["width"]) for im in d["images"]] == [SIZES[i % 3] for i in range(n)]
        for im in d["images"]:
            with Image.open(os.path.join(root, f"{split}2017", im["file_name"])) as f:
                assert f.size == (im["width"], im["height"])
        for a in d["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= im["width"] + 0.01 and y + h <= im["height"] + 0.01
            assert 0 < a["area"] <= w * h + 0.01
    assert stats["train"]["small"] >= 20 and stats["train"]["crowd"] >= 2 and stats["val"]["crowd"] >= 2


def test_crowd_regions_are_coco_crowd_annotations(coco_like):
    root, _ = coco_like
    d = annotations(root, "train")
    images = {im["id"]: im for im in d["images"]}
    crowds = [a for a in d["annotations"] if a["iscrowd"]]
    assert crowds and {a["category_id"] for a in d["annotations"]} <= set(data.SHAPES.values())
    for a in crowds:  # uncompressed RLE, as COCO stores crowds; bbox and area are those of its pixels
        im = images[a["image_id"]]
        assert a["segmentation"]["size"] == [im["height"], im["width"]]
        rle = mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"])
        assert int(mask_utils.area(rle)) == a["area"]
        assert mask_utils.toBbox(rle).tolist() == a["bbox"]
    ds = data.CocoDetection(root, "train")  # crowds stay out of the training targets
    for i in range(len(ds)):
        plain = [a for a in d["annotations"] if a["image_id"] == ds.ids[i] and not a["iscrowd"]]
        assert len(ds.load(i)[1]["boxes"]) == len(plain)


def test_a_detection_on_a_crowd_region_is_ignored_by_cocoeval(coco_like):
    root, _ = coco_like
    ds = data.CocoDetection(root, "val", masks=False)
    anns = ds.coco.dataset["annotations"]
    exact = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.9)
             for a in anns if not a["iscrowd"]]
    on_crowds = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=1.0)
                 for a in anns if a["iscrowd"]]  # ranked first: as false positives they would cost precision
    assert on_crowds and data.score(ds.coco, exact + on_crowds)["AP"] == pytest.approx(1.0)
    elsewhere = [dict(d, bbox=[0, 0, 4, 4]) for d in on_crowds]  # the same detections off the crowds
    assert data.score(ds.coco, exact + elsewhere)["AP"] < 0.9


def test_the_options_leave_the_objects_as_they_were(tmp_path):
    """The default's square as `sizes`, and crowds, change nothing else: the built-in benchmark stays."""
    kw = dict(n_train=4, n_val=2, size=64, seed=3, progress=False)
    data.make_shapes(str(tmp_path / "a"), **kw)
    data.make_shapes(str(tmp_path / "b"), **kw, sizes=[(64, 64)])
    data.make_shapes(str(tmp_path / "c"), **kw, crowd=1.0)
    for split in ("train", "val"):
        a, b, c = (annotations(str(tmp_path / x), split) for x in "abc")
        assert a == b
        assert [x for x in c["annotations"] if not x["iscrowd"]] == a["annotations"]
        for im in a["images"]:
            pa, pb = (np.asarray(Image.open(tmp_path / x / f"{split}2017" / im["file_name"])) for x in "ab")
            assert (pa == pb).all()


def test_bad_options_are_one_line_errors(tmp_path):
    for kw, msg in ((dict(sizes=[(64,)]), "sizes must be"), (dict(sizes=[]), "sizes must be"),
                    (dict(sizes=[(8, 64)]), "at least 16"), (dict(crowd=1.5), "crowd is the share")):
        with pytest.raises(ValueError, match=msg) as e:
            data.make_shapes(str(tmp_path), n_train=1, n_val=1, progress=False, **kw)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# End to end through the command line, float32 and bf16
# ---------------------------------------------------------------------------------------------------------
def run(capsys, *argv):
    """train.main in this process (no interpreter start-up per command); its stdout."""
    train.main([str(a) for a in argv])
    return capsys.readouterr().out


def fit(root, label, scale, steps, path):
    """A RetinaNet-R18 trained as `train --min-size 96 --max-size 128 --anchor-base 16` trains one
    (engine.fit: train, evaluate, save with its spec), but with a 32-channel FPN and 1-conv heads:
    `train` has no flag for the widths, and at torchvision's (256 channels, 4 convs) a step takes seconds
    here, far from the ~60 steps after which a student has detections above the 0.05 score threshold.
    A short warm-up and a higher LR for the same reason. Returns the spec."""
    train_loader, val_loader = engine.loaders(root, 4, 0, masks=False)
    cats = train_loader.dataset.category_ids
    spec = engine.make_spec(label, "retinanet_r18", scale, 96, cats, max_size=128, anchor_base=16,
                            fpn_channels=32, head_convs=1, pretrained=False)
    engine.fit(engine.build(spec, 0), spec, str(path), train_loader, val_loader, steps, torch.device("cpu"),
               0, dict(train.RECIPE, lr=2e-3, warmup=10), desc=label)
    return spec


def matched(a, b, top=20, iou=0.9):
    """The share of the `top` highest-scoring detections of `a` that `b` has too: same image and
    category, IoU >= `iou` (COCO results lists, boxes xywh)."""
    def xyxy(boxes):
        return box_convert(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")

    a = sorted(a, key=lambda d: -d["score"])[:top]
    found = 0
    for d in a:
        key = (d["image_id"], d["category_id"])
        same = [e["bbox"] for e in b if (e["image_id"], e["category_id"]) == key]
        found += bool(same) and box_iou(xyxy([d["bbox"]]), xyxy(same)).max().item() >= iou
    return found / max(len(a), 1)


@pytest.mark.slow
def test_coco_like_end_to_end_in_float32_and_bf16(coco_like, tmp_path, capsys):
    root, _ = coco_like
    common = ["--data", root, "--seed", "0"]
    # `train` itself on this data: its spec (sizes, original category ids), a checkpoint that evaluates
    run(capsys, "train", "--model", "retinanet_r18", "--scale", 0.5, "--label", "student", "--epochs", 0,
        "--precision", "fp32", *SMALL, *common, "--out", tmp_path / "cli")
    ck = torch.load(tmp_path / "cli" / "model.pt", weights_only=True)
    assert 0 <= ck["metrics"]["AP"] <= 1
    teacher, student = tmp_path / "r18.pt", tmp_path / "student.pt"
    spec = fit(root, "student", 0.5, 60, student)
    assert {k: v for k, v in spec.items() if k not in ("fpn_channels", "head_convs")} == ck["spec"]
    fit(root, "r18", 1.0, 10, teacher)  # only its features matter here

    run(capsys, "cost", "--ckpts", student, teacher, "--images", 8, *common, "--out", tmp_path / "cost.json")
    cost = json.load(open(tmp_path / "cost.json"))
    assert set(cost["cost"]) == {"student", "r18"} and cost["cost"]["student"]["r18"] >= 0
    assert run(capsys, "order", "--cost", tmp_path / "cost.json", "--student", "student").strip() == "r18"
    ap, detections, val = {}, {}, data.CocoDetection(root, "val", masks=False)
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"distill_{precision}"
        log = run(capsys, "distill", "--student", student, "--teachers", teacher, "--steps", 4,
                  "--no-inherit", "--images", 8, "--batch", 4, "--precision", precision, *common,
                  "--out", out)
        assert f"precision {precision}" in log and "order: r18" in log  # BGS, on the costs it computed
        assert json.load(open(out / "order.json"))["precision"] == precision and (out / "cost.json").is_file()
        distilled = torch.load(out / "student.pt", weights_only=True)
        before = torch.load(student, weights_only=True)["model"]
        assert distilled.keys() == before.keys()
        assert any(not torch.equal(distilled[k], before[k]) for k in before if before[k].is_floating_point())
        log = run(capsys, "eval", "--ckpt", out / "stage1.pt", "--precision", precision, *common,
                  "--out", out / "eval")
        assert "Average Precision" in log and "latency" in log
        detections[precision] = json.load(open(out / "eval" / "detections_bbox.json"))
        ids = {d["category_id"] for d in detections[precision]}
        assert ids <= set(data.SHAPES.values()) and ids & {8, 9}  # the original ids, not labels 1..5
        ap[precision] = data.score(val.coco, detections[precision])["AP"]  # of what eval wrote
        assert 0 <= ap[precision] <= 1
    with capsys.disabled():
        print(f"\n[test_realdata] val AP fp32 {ap['fp32']:.4f}, bf16 {ap['bf16']:.4f}")
    # Both runs start from the same student and see the same batches, and 4 warm-up steps move a weight by
    # about 1e-4 at most: what differs is the bf16 forward, which moves boxes by a fraction of a pixel and
    # scores by a few percent. So the same detections come out (the top 20 of each, at IoU >= 0.9), and
    # AP moves only where near-equal scores swap ranks: a small fraction of itself. 25% of AP (+0.002, for
    # an AP near 0) allows for that, yet fails a bf16 path that loses its detections, misplaces its boxes
    # or puts them on bf16's grid (4-8 px at COCO's sizes).
    assert ap["fp32"] > 0  # the student finds objects: the comparison has content
    assert abs(ap["fp32"] - ap["bf16"]) <= 0.25 * ap["fp32"] + 0.002
    assert matched(detections["fp32"], detections["bf16"]) >= 0.9
    assert matched(detections["bf16"], detections["fp32"]) >= 0.9


# ---------------------------------------------------------------------------------------------------------
# gpu_check.py on a CPU
# ---------------------------------------------------------------------------------------------------------
def test_gpu_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out)])
    r = json.load(open(out))
    low = r["low_precision"]
    assert low in ("bf16", "fp16") and set(r["precisions"]) == {"fp32", low}
    for p in ("fp32", low):
        assert r["precisions"][p]["images_per_s"] > 0 and r["precisions"][p]["timed_steps"] >= 1
        assert np.isfinite(r["precisions"][p]["det_loss"]) and np.isfinite(r["precisions"][p]["distill_loss"])
    check = r["box_check"]
    assert check["precision"] == low and check["boxes"] > 0 and check["inner_coords"] > 0
    assert 0 <= check["matched"] <= 1 and check["median_px"] >= 0 and isinstance(check["ok"], bool)
    assert check["on_grid"] < 0.05  # float32 boxes under the autocast (models.float32_outputs)
