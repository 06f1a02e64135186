"""`kdscale experiment`: config, plan, sharing check, pooled paired bootstrap (hand-made cases), and
a tiny experiment end to end whose aggregate equals what the per-run evaluation files give."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdscale.config import ConfigError
from kdscale.metrics.classification import label_metrics
from kdscale.eval.predictions import Predictions
from kdscale.experiments.aggregate import pooled_paired_bootstrap
from kdscale.experiments.runner import check_sharing, load_experiment, plan_units, run_experiment

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "configs" / "experiment_tiny.yaml"


def _write(tmp_path, **changes) -> Path:
    tree = yaml.safe_load(TINY.read_text())
    tree.update(out_dir=str(tmp_path / "exp"), base=str(ROOT / tree["base"]), **changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "experiments").glob("*.yaml")))
def test_shipped_experiments_load_and_share_honestly(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    exp = load_experiment(ROOT / "configs" / "experiments" / name)
    units = plan_units(exp, seeds=exp.seeds[:1])
    check_sharing(exp, units)
    assert len(units) == 2 + len(exp.arms)


def test_plan_shares_data_once_and_teachers_per_seed(tmp_path):
    exp = load_experiment(_write(tmp_path))
    units = plan_units(exp)
    assert [u.kind for u in units] == ["shared", "seed", "arm", "arm", "seed", "arm", "arm"]
    configs = check_sharing(exp, units)
    by = {(u.kind, u.seed, u.arm): configs[u.run_dir] for u in units}
    shared = by[("shared", None, None)]
    for seed in (0, 1):
        seed_cfg, joint, mind = by[("seed", seed, None)], by[("arm", seed, "joint")], by[("arm", seed, "mind")]
        assert joint.shards.out_dir == mind.shards.out_dir == shared.shards.out_dir
        assert joint.teachers.out_dir == mind.teachers.out_dir == seed_cfg.teachers.out_dir
        assert joint.run.seed == mind.run.seed == seed
        assert [s.name for s in joint.students] == ["joint"] and [s.name for s in mind.students] == ["mind"]
        assert joint.run.out_dir != mind.run.out_dir
    assert by[("seed", 0, None)].teachers.out_dir != by[("seed", 1, None)].teachers.out_dir


def test_sweep_and_from_base_arms(tmp_path):
    arms = [{"name": "mind", "from_base": "mind", "student": {"train": {"epochs": 2},
                                                               "mind": {"omega": {"image": 0.0, "ehr": 1.0}}}}]
    sweep = {"from_arm": "mind", "name": "w", "key": "mind.omega", "values": [{"image": 0.0, "ehr": 0.5}]}
    exp = load_experiment(_write(tmp_path, arms=arms, sweep=sweep, reference=""))
    assert [a.name for a in exp.arms] == ["mind", "w-0"] and exp.reference == "mind"
    configs = check_sharing(exp, plan_units(exp, seeds=[0]))
    students = {c.students[0].name: c.students[0] for c in configs.values() if c.students}
    assert students["w-0"].mind.omega == {"image": 0.0, "ehr": 0.5}
    assert students["mind"].mind.omega == {"image": 0.0, "ehr": 1.0}       # the sweep did not leak back
    assert students["mind"].mind.temperature == 2.0                         # the base student's value
    assert students["w-0"].train.epochs == students["mind"].train.epochs == 2   # from the arm, over the base


def test_an_arm_may_not_change_what_its_seed_shares(tmp_path):
    arms = [{"name": "joint", "student": {"method": "joint", "model": {"kind": "joint"}},
             "overrides": ["teachers.train.epochs=5"]}]
    exp = load_experiment(_write(tmp_path, arms=arms, reference=""))
    with pytest.raises(ConfigError, match="arm 'joint' changes \\['teachers'\\]"):
        check_sharing(exp, plan_units(exp))


def test_bad_experiment_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="reference"):
        load_experiment(_write(tmp_path, reference="nope"))
    with pytest.raises(ConfigError, match="arms"):
        load_experiment(_write(tmp_path, arms=[]))
    with pytest.raises(ConfigError, match="from_base 'nope'"):
        exp = load_experiment(_write(tmp_path, arms=[{"name": "a", "from_base": "nope"}], reference=""))
        plan_units(exp)


def _preds(y, p, patients):
    n = len(y)
    return Predictions(keys=[f"k{i}" for i in range(n)], patient_ids=list(patients), label_names=["a", "b"],
                       labels=np.asarray(y, float), heads={"fusion": (np.asarray(p, float), np.ones(n, bool))},
                       present={"image": np.ones(n, bool), "ehr": np.ones(n, bool)})


def test_pooled_bootstrap_point_is_the_seed_mean_of_macro_differences():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(40, 2)).astype(float)
    y[0] = [0, 1]
    y[1] = [1, 0]
    patients = [f"p{i // 2}" for i in range(40)]
    ref = [_preds(y, rng.random((40, 2)), patients) for _ in range(3)]
    arm = [_preds(y, np.clip(y * 0.3 + rng.random((40, 2)), 0, 1), patients) for _ in range(3)]
    got = pooled_paired_bootstrap([(r, "fusion") for r in ref], [(a, "fusion") for a in arm], "paired", 200)
    per_seed = [label_metrics(y, r.heads["fusion"][0])["auroc_macro"] - label_metrics(y, a.heads["fusion"][0])
                ["auroc_macro"] for r, a in zip(ref, arm)]
    assert got["diff"] == pytest.approx(np.mean(per_seed))
    assert got["n"] == 40 and got["n_patients"] == 20 and got["seeds"] == 3
    assert got["low"] <= got["diff"] <= got["high"]
    # the same arm twice: a zero difference, p = 1
    same = pooled_paired_bootstrap([(r, "fusion") for r in ref], [(r, "fusion") for r in ref], "all", 50)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    # only some labels (eval.signal_labels): the macro over label "b" alone
    only_b = pooled_paired_bootstrap([(r, "fusion") for r in ref], [(a, "fusion") for a in arm], "all", 50,
                                     labels=["b"])
    per_seed_b = [label_metrics(y[:, 1:], r.heads["fusion"][0][:, 1:])["auroc_macro"]
                  - label_metrics(y[:, 1:], a.heads["fusion"][0][:, 1:])["auroc_macro"] for r, a in zip(ref, arm)]
    assert only_b["diff"] == pytest.approx(np.mean(per_seed_b)) and only_b["labels"] == ["b"]
    assert got["labels"] == "all" and only_b["diff"] != pytest.approx(got["diff"])
    with pytest.raises(ValueError, match="label 'z' is not a label of the runs"):
        pooled_paired_bootstrap([(ref[0], "fusion")], [(arm[0], "fusion")], "all", 10, labels=["z"])


def test_run_metrics_reads_the_signal_label_macro():
    from kdscale.experiments.aggregate import run_metrics

    evaluation = {"main_head": "routed", "heads": {"routed": {
        "all": {"auroc_macro": {"value": 0.6}, "auprc_macro": {"value": 0.3}, "signal": {"auroc_macro": {"value": 0.7}}},
        "paired": {"auroc_macro": {"value": 0.62}, "auprc_macro": {"value": 0.31}}}}}
    got = run_metrics(evaluation)
    assert got["signal.auroc_macro/all"] == 0.7 and got["auroc_macro/paired"] == 0.62
    assert "signal.auroc_macro/paired" not in got


def test_pooled_bootstrap_refuses_seeds_with_different_test_labels():
    y = np.array([[0, 1], [1, 0], [1, 1], [0, 0]], float)
    a = _preds(y, np.random.default_rng(1).random((4, 2)), "abcd")
    b = _preds(1 - y, np.random.default_rng(2).random((4, 2)), "abcd")
    with pytest.raises(ValueError, match="labels differ"):
        pooled_paired_bootstrap([(a, "fusion"), (b, "fusion")], [(a, "fusion"), (b, "fusion")], "all", 10)


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    """2 arms x 2 seeds of real pipeline runs, run once for this module: (config path, out dir)."""
    from kdscale.cli import main

    tmp_path = tmp_path_factory.mktemp("experiment")
    cfg = _write(tmp_path)
    assert main(["experiment", "--cfg", str(cfg)]) == 0
    return cfg, tmp_path / "exp"


@pytest.mark.slow
def test_tiny_experiment_end_to_end_and_its_aggregate(tiny_experiment, capsys):
    """2 arms x 2 seeds of real pipeline runs; every aggregate number recomputed from the runs'
    own evaluation.json / predictions.csv; a second call resumes (runs nothing)."""
    from kdscale.cli import main
    from kdscale.eval.predictions import read_predictions

    cfg, out = tiny_experiment
    agg = json.loads((out / "results" / "tiny" / "aggregate.json").read_text())
    assert set(agg["arms"]) == {"joint", "mind"} and agg["seeds"] == [0, 1] and not agg["missing"]
    for arm in ("joint", "mind"):
        values = []
        for seed in (0, 1):
            ev = json.loads((out / f"seed-{seed}" / arm / "eval" / arm / "test" / "evaluation.json").read_text())
            assert ev["info"]["seed"] == seed
            values.append(ev["heads"][ev["main_head"]]["all"]["auroc_macro"]["value"])
        m = agg["arms"][arm]["metrics"]["auroc_macro/all"]
        assert m["mean"] == pytest.approx(np.mean(values))
        assert m["sd"] == pytest.approx(np.std(values, ddof=1))
        assert [m["per_seed"][s] for s in ("0", "1")] == pytest.approx(values)
    # the teachers were trained once per seed (their own seed), the students per arm
    sha = [json.loads((out / f"seed-{s}" / "teachers" / "ehr_lstm" / "teacher.json").read_text())["checkpoint_sha256"]
           for s in (0, 1)]
    assert sha[0] != sha[1]
    for s in (0, 1):
        info = json.loads((out / f"seed-{s}" / "mind" / "students" / "mind" / "student.json").read_text())
        assert info["seed"] == s
        assert Path(info["soft_labels"]).resolve() == (out / f"seed-{s}" / "softlabels").resolve()
    # the signal labels (eval.signal_labels) get their own macro and their own pooled comparison
    assert agg["arms"]["mind"]["metrics"]["signal.auroc_macro/all"]["mean"] is not None
    assert any(c.get("labels") == ["Shock", "Essential hypertension"] and "skipped" not in c for c in agg["comparisons"])
    comp = next(c for c in agg["comparisons"] if c["cohort"] == "all" and c["metric"] == "auroc_macro"
                and c["labels"] == "all")
    diffs = []
    for seed in (0, 1):
        preds = {}
        for arm in ("joint", "mind"):
            d = out / f"seed-{seed}" / arm / "eval" / arm / "test"
            ev = json.loads((d / "evaluation.json").read_text())
            preds[arm] = (read_predictions(d / "predictions.csv"), ev["main_head"])
        sel = preds["joint"][0].heads[preds["joint"][1]][1] & preds["mind"][0].heads[preds["mind"][1]][1]
        y = preds["joint"][0].labels[sel]
        diffs.append(label_metrics(y, preds["mind"][0].heads[preds["mind"][1]][0][sel])["auroc_macro"]
                     - label_metrics(y, preds["joint"][0].heads[preds["joint"][1]][0][sel])["auroc_macro"])
    assert comp["diff"] == pytest.approx(np.mean(diffs), abs=1e-9)
    assert comp["low"] <= comp["high"]
    report = out / "results" / "tiny"
    assert (report / "report.html").is_file() and "mind" in (report / "report.md").read_text()
    _online_equals_offline_without_augmentation(out / "seed-0" / "mind" / "config.yaml")
    capsys.readouterr()
    assert main(["experiment", "--cfg", str(cfg)]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 7
    assert main(["experiment", "--cfg", str(cfg), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("[done]") == 7


@pytest.mark.slow
def test_experiment_report_in_headless_chromium(tiny_experiment, tmp_path):
    """The aggregate report opens in a real browser with its three tables (arms, every seed,
    each arm vs the reference), one row per arm, a column per seed."""
    from browser import chromium_or_skip, dump_dom

    chromium = chromium_or_skip()
    _, out = tiny_experiment
    page = tmp_path / "check.html"
    probe = ("<script>window.addEventListener('load', function () {"
             "document.body.setAttribute('data-sections', Array.from(document.querySelectorAll('section'))"
             ".map(function (s) { return s.id + ':' + s.querySelectorAll('tbody tr').length; }).join(','));"
             "});</script>")
    page.write_text((out / "results" / "tiny" / "report.html").read_text().replace("</body>", probe + "</body>"))
    dom = dump_dom(chromium, page)
    sections = dict(item.split(":") for item in re.search(r'data-sections="([^"]*)"', dom).group(1).split(","))
    assert set(sections) >= {"arms", "seeds", "comparisons"}
    assert int(sections["arms"]) == 2 and int(sections["seeds"]) == 2 and int(sections["comparisons"]) >= 1
    assert "seed 0" in dom and "seed 1" in dom


def _online_equals_offline_without_augmentation(run_config: Path):
    """Online KD (teachers forward the loader's batch) reproduces the stored soft labels exactly
    when the batch is not augmented: the only difference between the modes is the view."""
    import dataclasses

    import torch

    from kdscale.data.loader import build_loader
    from kdscale.data.shards import shards_out_dir
    from kdscale.distill.online_kd import OnlineSoftLabels, load_online_teachers
    from kdscale.distill.student_training import student_loader_config
    from kdscale.distill.teacher_pass import softlabels_dir
    from kdscale.schema import load_config

    cfg = load_config(run_config)
    student = cfg.students[0]
    loader_cfg = dataclasses.replace(student_loader_config(cfg, student), augment="none", num_workers=0)
    stored = build_loader(shards_out_dir(cfg), "train", loader_cfg, train=False, soft_dir=softlabels_dir(cfg))
    online = OnlineSoftLabels(build_loader(shards_out_dir(cfg), "train", loader_cfg, train=False),
                              load_online_teachers(cfg, ["ehr"]))
    n = 0
    for a, b in zip(stored, online):
        assert list(a["key"]) == list(b["key"])
        col = 0   # the tiny experiment has one ensemble ("ehr") in both
        seen = a["soft"]["ensemble_seen"][:, col].bool()
        assert torch.equal(seen, b["soft"]["ensemble_seen"][:, col].bool())
        torch.testing.assert_close(a["soft"]["ensemble"][:, col][seen].float(),
                                   b["soft"]["ensemble"][:, col][seen].float(), rtol=2e-3, atol=2e-3)  # stored as float16
        n += int(seen.sum())
    assert n > 0


def test_cli_help_dry_run_and_bad_selection(tmp_path, capsys):
    from kdscale.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["experiment", "--help"])
    assert exc.value.code == 0 and "--dry-run" in capsys.readouterr().out
    cfg = str(_write(tmp_path))
    assert main(["experiment", "--cfg", cfg, "--dry-run", "--only", "mind", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("[to run]") == 3 and "arm mind" in out and "arm joint" not in out
    assert "launch/submit.py" in out and "--stages train,eval" in out
    assert not (tmp_path / "exp").exists()          # a dry run writes nothing
    assert main(["experiment", "--cfg", cfg, "--only", "nope"]) == 2
    assert "unknown arm(s) ['nope']" in capsys.readouterr().err
    assert main(["experiment", "--cfg", cfg, "--seeds", "7"]) == 2


def test_online_kd_is_a_mind_mode():
    from kdscale.schema import load_config

    with pytest.raises(ConfigError, match="online_kd is a MIND measurement mode"):
        load_config(ROOT / "configs" / "vit.yaml", ["students.0.online_kd=true"])
