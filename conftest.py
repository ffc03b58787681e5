"""Shared test helpers: tiny detectors and batches, tiny COCO-format folders and checkpoints, the CLI."""
import io
import os
import subprocess
import sys
import traceback
from contextlib import redirect_stdout

import pytest
import torch

import data
import engine
import mtpd
import train
from models import build_detector

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_detector(name="retinanet_r18", scale=1.0, num_classes=8, size=64, **kw):
    return build_detector(name, num_classes, scale=scale, min_size=size, max_size=size,
                          **{"fpn_channels": 16, "head_convs": 1, "anchor_base": 4, **kw})


def tiny_batch(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 24.0]]), "labels": torch.tensor([1])}] * n
    return images, targets


def run_cli(*argv, cwd=HERE, script="train.py", **kw):
    """A command in a fresh process: (CompletedProcess with stdout and stderr as text)."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=600, **kw)


def cli(capsys, *argv):
    """train.main in this process, for a command that fails: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    return root, data.make_shapes(root, n_train=12, n_val=6, size=64, seed=3, progress=False)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny COCO-format folder, and tiny student and teacher checkpoints made on it."""
    base = tmp_path_factory.mktemp("zoo")
    root = str(base / "data")
    data.make_shapes(root, n_train=8, n_val=4, size=64, seed=5, progress=False)
    cats = data.CocoDetection(root, "val", masks=False).category_ids
    for label, name in (("s", "retinanet_r18"), ("t1", "retinanet_r34"), ("t2", "retinanet_r18")):
        spec = engine.make_spec(label, name, 1.0, 64, cats, fpn_channels=16, head_convs=1)
        model = engine.build(spec, len(label))
        engine.save_ckpt(str(base / f"{label}.pt"), model, spec, {"AP": 0.1 * len(label)})
    return base, root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`python train.py --preset tiny` once, in this process, recording the deepest stack of the project's
    frames that reached the feature loss (what a reader follows). -> (run folder, results, stack, output)."""
    out, deepest, loss = str(tmp_path_factory.mktemp("tiny") / "runs" / "tiny"), [], mtpd.feature_loss
    cwd, buf = os.getcwd(), io.StringIO()

    def recording(*a, **kw):
        stack = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(HERE)]
        if len(stack) >= len(deepest):  # the last of the deepest: an MTPD stage
            deepest[:] = stack
        return loss(*a, **kw)

    mtpd.feature_loss = recording
    try:
        os.chdir(os.path.dirname(os.path.dirname(out)))  # as `python train.py`: data/ and runs/ in the cwd
        with redirect_stdout(buf):
            results = train.main(["--preset", "tiny"])
    finally:
        mtpd.feature_loss = loss
        os.chdir(cwd)
    return out, results, deepest, buf.getvalue()
