"""Tests of the analyses (analysis.py) and the report (report.py): the numbers behind each plot."""
import itertools
import json
import math
import os

import pytest
import torch

import analysis
import report
from conftest import run_cli, tiny_batch, tiny_detector


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    model = tiny_detector()
    images, targets = tiny_batch(2)
    return model, [(images, targets)]


def test_filter_normalised_direction(student):
    model, _ = student
    d = analysis.random_direction(model, seed=3)
    for name, w in model.named_parameters():
        if w.dim() <= 1:  # biases and norm parameters are left out (Li et al.'s ignore-biasbn)
            assert not d[name].any()
        else:  # each filter of the direction has the norm of the same filter of the weights
            assert torch.allclose(d[name].flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1),
                                  rtol=1e-4)
    again = analysis.random_direction(model, seed=3)
    other = analysis.random_direction(model, seed=4)
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert any(not torch.equal(d[k], other[k]) for k in d if d[k].any())


def test_landscape_at_radius_zero_is_the_plain_loss_and_weights_are_restored(student):
    model, batches = student
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = analysis.detection_loss(model, batches)
    d = analysis.random_direction(model, 0)
    at = analysis.loss_at(model, batches, [d], [[0.0], [0.5], [0.0]])
    assert at[0] == pytest.approx(plain, rel=1e-5) and at[2] == pytest.approx(plain, rel=1e-5)
    assert at[1] != pytest.approx(plain, rel=1e-3)  # a step along the direction changes the loss
    land = analysis.landscape(model, batches, radius=0.5, points=5, dirs_1d=2, points_2d=3)
    assert land["alphas"][2] == 0.0 and land["loss0"] == pytest.approx(plain, rel=1e-5)
    assert all(c[2] == pytest.approx(plain, rel=1e-5) for c in land["curves"])
    assert land["grid"][1][1] == pytest.approx(plain, rel=1e-5)  # the 2-D grid's centre too
    assert len(land["grid"]) == 3 and all(len(r) == 3 for r in land["grid"])
    # weights (and BatchNorm statistics: BN runs in eval mode inside the loss) are exactly as before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loss_at_restores_weights_when_interrupted(student, monkeypatch):
    model, batches = student
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis, "detection_loss", boom)
    with pytest.raises(KeyboardInterrupt):
        analysis.loss_at(model, batches, [analysis.random_direction(model, 0)], [[0.3]])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_flatness_by_hand():
    land = {"alphas": [-0.4, -0.2, 0.0, 0.2, 0.4], "loss0": 1.0,
            "curves": [[3.0, 1.5, 1.0, 1.7, 2.0], [2.0, 1.1, 1.0, 1.3, 4.0]]}
    # rise at 0.2: ((1.5 + 1.7) / 2 - 1 + (1.1 + 1.3) / 2 - 1) / 2 = (0.6 + 0.2) / 2
    assert analysis.flatness(land, 0.2) == pytest.approx(0.4)
    assert analysis.flatness(land, 0.4) == pytest.approx(((2.5 - 1) + (3.0 - 1)) / 2)


def test_all_orders_has_n_factorial_rows_and_ranks_bgs():
    calls = []
    ap = {"a": 0.1, "b": 0.2, "c": 0.3}

    def run_order(order):  # a fake progressive run: the AP after each stage grows with later teachers
        calls.append(tuple(order))
        return [{"AP": sum(ap[t] * (j + 1) for j, t in enumerate(order[:i + 1]))} for i in range(len(order))]

    rows = analysis.all_orders(["a", "b", "c"], run_order)
    assert sorted(calls) == sorted(itertools.permutations("abc"))  # every order run once
    assert len(rows) == math.factorial(3) == len({tuple(r["order"]) for r in rows})
    assert [r["AP"] for r in rows] == sorted((r["AP"] for r in rows), reverse=True)
    assert rows[0]["order"] == ["a", "b", "c"] and rows[0]["stage_AP"] == pytest.approx([0.1, 0.5, 1.4])
    assert analysis.rank_of(rows, ["a", "b", "c"]) == 1 and analysis.rank_of(rows, ["c", "b", "a"]) == 6
    assert analysis.rank_of(rows, ["a", "b"]) is None


def fake_results():
    cost = {"ots": {"t1": 0.5, "t2": 0.7}, "t1": {"ots": 0.6, "t2": 0.3}, "t2": {"ots": 0.6, "t1": 0.4}}
    m = {"AP": 0.3, "AP50": 0.5, "AP75": 0.3, "APs": 0.1, "APm": 0.4, "APl": -1}
    land = {"alphas": [-0.2, 0.0, 0.2], "curves": [[1.5, 1.0, 1.4]], "alphas_2d": [-0.2, 0.0, 0.2],
            "grid": [[2, 1.5, 2], [1.5, 1.0, 1.5], [2, 1.5, 2]], "loss0": 1.0}
    return {"preset": "tiny", "seed": 0, "budget_steps": 20, "wall_minutes": 1.0, "cost": cost,
            "order": ["t1", "t2"], "teachers": {"t1": m, "t2": m}, "runs": {"ots": m, "long": m, "mtpd": m},
            "stages": [{"teacher": "t1", **m}, {"teacher": "t2", **m}],
            "analysis": {"generalization": {"long": [{"step": 0, "AP": 0.2, "det_loss": 1.0}]},
                         "landscape": {"long": land}, "flatness": {"long": {"0.2": 0.45}}}}


def test_report_without_matplotlib_gives_every_figure_as_a_table(tmp_path):
    path = report.write_report(str(tmp_path), fake_results(), plt=None)
    text = open(path).read()
    assert "matplotlib is not installed" in text and "![" not in text
    assert "**0.500**" in text and "**0.300**" in text  # the BGS path ots -> t1 -> t2 is marked
    assert "0.450" in text
    assert "| long | 0 | 20.0 | 1.000 |" in text  # the generalization point as a row
    assert "| ots | 30.0 | 50.0 | 30.0 | 10.0 | 40.0 | n/a |" in text


def test_report_with_matplotlib_draws_the_figures(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.write_report(str(tmp_path), fake_results())
    text = open(path).read()
    for fig in ("cost", "stages", "generalization", "landscape"):
        assert f"(figures/{fig}.png)" in text and os.path.getsize(tmp_path / "figures" / f"{fig}.png") > 1000
    assert report.bgs_path(["t1", "t2"], "ots") == [("ots", "t1"), ("t1", "t2")]


def test_seeds_aggregate_rows_of_every_seed_gaps_per_seed_and_the_premise(tmp_path):
    """Two seeds whose BGS orders differ and whose rows differ (an extra row on seed 0): the mean covers the
    rows of every seed, the notes say why, the gaps are paired per seed, the premise is averaged."""
    def one(seed, ap, order, extra=()):
        r = fake_results()
        row = dict(r["runs"]["ots"])
        r["seed"], r["order"] = seed, order
        r["runs"] = {k: dict(row, AP=v) for k, v in zip(("long", "direct", "mtpd", "direct_bridge"), ap)}
        r["runs"].update({k: dict(row) for k in extra})
        r["premise"] = {t: {"teacher_AP": 0.6, "cost": c, "kept": t == "t1" or seed == 0, "AP": a}
                        for t, c, a in (("t1", 0.5 + seed, ap[1]), ("t2", 0.7, ap[3]))}
        r["orders"] = {"bgs": order, "forward": order[-1:], "budget_steps": {"bgs": 20, "forward": 10}}
        return r

    per = {0: one(0, (0.40, 0.46, 0.44, 0.42), ["t2", "t1"], extra=["ensemble"]),
           1: one(1, (0.42, 0.50, 0.45, 0.43), ["t1"])}
    res = report.aggregate("gap", per)
    assert list(res["mean"]) == ["long", "direct", "mtpd", "direct_bridge"]  # no ensemble: seed 1 lacks it
    assert res["mean"]["mtpd"]["AP"] == pytest.approx(0.445)
    assert res["gaps"]["mtpd - direct"]["AP"]["mean"] == pytest.approx(-0.035)  # (-0.02 - 0.05) / 2
    assert res["gaps"]["mtpd - direct"]["AP"]["std"] == pytest.approx(0.03 / 2 ** 0.5)
    assert "different orders" in res["note"] and "ensemble" in res["note"]
    assert res["premise"]["t1"]["cost"] == pytest.approx((1.0, 0.5 ** 0.5))
    assert res["premise"]["t1"]["minus_long"][0] == pytest.approx(0.07)  # (0.06 + 0.08) / 2
    assert res["premise"]["t2"]["kept_on_seeds"] == 1
    text = open(report.write_seeds_report(str(tmp_path), res)).read()
    assert "| mtpd − direct | -2.0 | -5.0 |" in text
    assert "t2 (kept on 1 of 2 seeds)" in text and "seed 1: t1" in text
    if report.pyplot() is not None:  # Fig. 1 over seeds, drawn where matplotlib is
        assert "![premise.png](figures/premise.png)" in text
        assert (tmp_path / "figures" / "premise.png").stat().st_size > 0
    del per[1]["premise"]["t2"]  # distilled directly on seed 0 only (--premise): left out of the mean
    res = report.aggregate("gap", per)
    assert list(res["premise"]) == ["t1"] and "some seeds only" in res["note"]


@pytest.mark.slow
def test_order_all_distils_every_order_and_marks_bgs(zoo, tmp_path):
    base, root = zoo
    out = tmp_path / "orders"
    r = run_cli("order", "--all", "--ckpt-student", base / "s.pt", "--teachers", base / "t1.pt",
                base / "t2.pt", "--data", root, "--steps", "2", "--images", "4", "--batch", "2", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(out / "all_orders.json"))
    assert sorted(tuple(x["order"]) for x in res["rows"]) == [("t1", "t2"), ("t2", "t1")]
    bgs_ap = next(x["AP"] for x in res["rows"] if x["order"] == res["bgs"])
    assert res["bgs_rank"] == 1 + sum(x["AP"] > bgs_ap for x in res["rows"])
    assert all(len(x["stage_AP"]) == 2 and 0 <= x["AP"] <= 1 for x in res["rows"])
    # one checkpoint per distinct prefix
    assert sorted(os.listdir(out)) == sorted(["t1.pt", "t2.pt", "t1+t2.pt", "t2+t1.pt",
                                              "all_orders.json", "log.jsonl", "setup.json"])
    assert "<- BGS" in r.stdout
    # the cache is keyed by teachers: the same folder with other stage settings is refused, not reused
    r = run_cli("order", "--all", "--ckpt-student", base / "s.pt", "--teachers", base / "t1.pt",
                base / "t2.pt", "--data", root, "--steps", "3", "--images", "4", "--batch", "2", "--out", out)
    assert r.returncode == 2 and "another setup" in r.stderr and r.stderr.count("\n") == 1
