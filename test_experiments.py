"""experiments/: each script on the tiny run (conftest.tiny_run), checked by what it writes."""
import json
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
import seeds  # noqa: E402

from conftest import run_cli  # noqa: E402


def fake_run(seed, aps):
    return {"order": ["a", "b"], "wall_minutes": 1.0,
            "runs": {k: {c: v / 100 for c in seeds.COLS} for k, v in aps.items()}}


def test_seeds_aggregate_gives_mean_std_and_paired_gaps():
    per = {0: fake_run(0, dict(long=40, long_restart=39, direct=46, ensemble=45, mtpd=44)),
           1: fake_run(1, dict(long=42, long_restart=41, direct=46, ensemble=44, mtpd=47))}
    agg = seeds.aggregate(per)
    assert agg["rows"]["long"]["AP"] == pytest.approx([41.0, 2 ** 0.5])
    assert agg["gaps"]["mtpd − direct"]["AP"] == pytest.approx([-0.5, 1.5 * 2 ** 0.5])  # paired: -2, +1
    assert agg["gaps"]["direct − long"]["AP"] == pytest.approx([5.0, 2 ** 0.5])
    text = seeds.markdown(agg)
    assert "| **mtpd − direct** | -0.5 ± 2.1 |" in text and "seed 1: a → b" in text


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the tiny run (the experiments add files to it), with its data beside it."""
    src = tiny_run[0]
    dst = tmp_path_factory.mktemp("exp") / "run"
    shutil.copytree(src, dst)
    shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(src)), "data"), dst.parent / "data")
    res = json.load(open(dst / "results.json"))
    res["pool"] = str(dst / "ckpt")
    (dst / "results.json").write_text(json.dumps(res))
    return dst


@pytest.mark.slow
def test_orders_fig4_premise_and_report_on_the_tiny_run(run):
    res = json.load(open(run / "results.json"))
    for script, argv in (("orders.py", []), ("fig4.py", ["--mechanisms", "pkd"]), ("premise.py", []),
                         ("generalization.py", ["--batches", 1, "--points", 3, "--directions", 1]),
                         ("cache.py", []), ("report.py", [])):
        r = run_cli(run, *argv, script=os.path.join("experiments", script), cwd=run.parent)
        assert r.returncode == 0, (script, r.stderr[-2000:])
    orders = json.load(open(run / "orders.json"))
    n = len(res["order"])
    assert len(orders["rows"]) == (2 if n == 2 else 1) and 1 <= orders["bgs_rank"] <= len(orders["rows"])
    bgs = next(r for r in orders["rows"] if r["order"] == res["order"])
    assert bgs["AP"] == pytest.approx(res["runs"]["mtpd"]["AP"])  # the same stages as the run's MTPD row
    fig4 = json.load(open(run / "fig4.json"))
    assert set(fig4) == {"l2", "pkd"} and fig4["l2"]["direct"] == res["runs"]["direct"]["AP"]
    premise = json.load(open(run / "premise.json"))
    assert set(premise) == set(res["teachers"])
    assert premise[res["order"][-1]]["AP"] == res["runs"]["direct"]["AP"]  # its own direct row, reused
    gen = json.load(open(run / "generalization.json"))
    assert [p["stage"] for p in gen["generalization"]["mtpd"]] == list(range(n + 1))
    assert gen["generalization"]["mtpd"][-1]["AP"] == res["runs"]["mtpd"]["AP"]
    assert set(gen["flatness"]) == {"long", "mtpd"}
    cache = json.load(open(run / "cache.json"))
    assert set(cache) == {"cached", "teacher at every step"} and all(r["minutes"] > 0 for r in cache.values())
    report = (run / "report.md").read_text()
    assert "## Table 3" in report and "Table 2: every order" in report and "Fig. 4" in report


def test_an_experiment_without_a_run_says_so_in_one_line(tmp_path):
    r = run_cli(tmp_path / "nothing", script=os.path.join("experiments", "orders.py"))
    assert r.returncode != 0 and "results.json does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_gpu_check_tiny_on_a_cpu_and_bench_write_their_ratios(tmp_path):
    r = run_cli("--tiny", "--device", "cpu", "--out", tmp_path / "g.json",
                script=os.path.join("experiments", "gpu_check.py"))
    assert r.returncode == 0, r.stderr[-2000:]
    g = json.load(open(tmp_path / "g.json"))
    assert g["fp32"]["images_per_s"] > 0 and g["speedup"] > 0 and g["low"] in ("bf16", "fp16")
    r = run_cli("--size", 64, "--repeats", 1, "--out", tmp_path / "b.json",
                script=os.path.join("experiments", "bench.py"))
    assert r.returncode == 0, r.stderr[-2000:]
    b = json.load(open(tmp_path / "b.json"))
    keys = ["precision_gain_train_student", "precision_gain_eval_teacher", "distill_vs_student_forward",
            "distill_vs_student_cached", "cost_vs_forwards"]
    assert all(b[k] > 0 for k in keys) and b["distill_vs_student_forward"] > 1
