"""End to end through the CLI: the README's main job on a small embedded default."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdscale.cli import main

REPO = Path(__file__).resolve().parent.parent


def kdscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdscale.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


@pytest.mark.slow
def cfg_signal_labels() -> list:
    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["eval"]["signal_labels"]


def test_demo_pipeline_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = kdscale("pipeline", "--cfg", "configs/demo.yaml", f"run.out_dir={run}",
                     f"data.demo.out_dir={run}/demo-data", "data.demo.n=120",
                     f"eval.oracle_scores={run}/demo-data/kdscale-oracle/phenotyping.csv", "shards.max_samples_per_shard=40",
                     "loader.image_size=32", "loader.resize_size=36", "loader.batch_size=8",
                     *[f"teachers.members.{i}.epochs=1" for i in range(4)],
                     *[f"students.{i}.train.epochs=1" for i in range(5)], "eval.bootstrap=50",
                     "eval.min_group_size=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Outputs in {run}" in result.stdout
    outputs = json.loads((run / "pipeline.json").read_text())
    assert outputs["shards"]["verified"] is True
    assert outputs["softlabels"]["verified"] is True
    # configs/teachers/demo.yaml: a radiology-pretrained CXR net (a second shard set from the same
    # tree), its fine-tuned copy, an EHR LSTM and the report teacher
    assert set(outputs["teachers"]["val_auroc_macro"]) == {"cxr_radiology", "cxr_resnet10", "ehr_lstm_small",
                                                           "report_bert"}
    assert (run / "shards-radiology" / "train" / "index.json").is_file()
    assert kdscale("verify", str(run / "softlabels")).returncode == 0
    summary = json.loads((run / "data" / "data_summary.json").read_text())
    assert summary["ingest"]["read"] == summary["ingest"]["kept"] + summary["ingest"]["skipped"]
    assert set(summary["data"]["splits"]) == {"train", "val", "test"}
    assert (run / "config.yaml").is_file()
    # The shards hold exactly the kept samples, and verify agrees from the command line too.
    written = sum(json.loads(p.read_text())["num_samples"] for p in (run / "shards").glob("*/index.json"))
    assert written == summary["ingest"]["kept"]
    assert kdscale("verify", str(run / "shards")).returncode == 0
    # students, evaluation, report: the README's first command ends with the results and the report
    assert set(outputs["train"]["val_auroc_macro"]) == {"mind", "mind_val_labels", "joint", "mind_no_kd",
                                                        "image_resnet10"}
    for name in ("mind", "joint"):
        evaluation = json.loads((run / "eval" / name / "test" / "evaluation.json").read_text())
        assert evaluation["info"]["student"] == name
        assert {"full", "drop:image", "drop:ehr"} <= set(evaluation["robustness"]["conditions"])
        assert (run / "eval" / name / "test" / "predictions.csv").is_file()
    comparisons = json.loads((run / "eval" / "comparisons.json").read_text())
    # eval.compare_to: MIND distilling the labels its teachers know, minus each other student
    for labels in ("all", cfg_signal_labels()):   # every label, and the 12 with designed signal
        assert [c["run_b"] for c in comparisons if c["cohort"] == "paired" and c["labels"] == labels] == [
            "mind", "joint", "mind_no_kd", "image_resnet10"]
    assert {c["run_a"] for c in comparisons} == {"mind_val_labels", "mind_val_labels/image"}
    report = run / "report" / "report.html"
    assert report.is_file() and f"Report: {report}" in result.stdout
    assert "macro AUROC over all" in result.stdout and "  mind/" in result.stdout
    # teachers and ensembles are evaluated like the students, from their soft labels
    assert "teachers and ensembles" in result.stdout and "  teacher-ehr_lstm_small/score" in result.stdout
    references = json.loads((run / "eval" / "references.json").read_text())
    assert "teacher:ehr_lstm_small" in references["rows"] and references["skipped"] == []
    teacher = json.loads((run / "eval" / "teacher-ehr_lstm_small" / "test" / "evaluation.json").read_text())
    assert teacher["info"]["role"] == "teacher" and teacher["heads"]["score"]["all"]["n"] > 0
    # the commands on the run directory alone (its config.yaml): re-evaluate on val, re-render;
    # with an oracle file (here: the labels themselves, a perfect ceiling) and a signal label
    from kdscale.eval.references import split_samples

    val, _ = split_samples(run / "shards", "val")
    label = val.label_names[0]
    (tmp_path / "oracle.csv").write_text("key,both/" + label + "\n" + "".join(
        f"{k},{'' if y != y else int(y)}\n" for k, y in zip(val.keys, val.labels[:, 0])))
    again = kdscale("eval", "--run", str(run), "--split", "val", "--no-report", "eval.bootstrap=20",
                    f"eval.oracle_scores={tmp_path / 'oracle.csv'}", f'eval.signal_labels=["{label}"]')
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "eval" / "mind" / "val" / "evaluation.json").is_file()
    oracle = json.loads((run / "eval" / "oracle-both" / "val" / "evaluation.json").read_text())
    assert oracle["heads"]["score"]["all"]["signal"]["auroc_macro"]["value"] in (1.0, None)
    mind_val = json.loads((run / "eval" / "mind" / "val" / "evaluation.json").read_text())
    assert mind_val["heads"][mind_val["main_head"]]["all"]["signal"]["labels"] == [label]
    rendered = kdscale("report", "--run", str(run))
    assert rendered.returncode == 0 and f"report: {report}" in rendered.stdout
    missing = kdscale("eval", "--run", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no config.yaml" in missing.stderr


def test_demo_data_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert main(["demo-data", "--out", str(tmp_path / name), "--n", "30", "--seed", "7"]) == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 50
    for rel in files_a:
        if rel.name == "kdscale_demo.json":
            continue  # the marker records the folder's own absolute path
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_demo_data_refuses_a_folder_with_other_parameters(tmp_path, capsys):
    assert main(["demo-data", "--out", str(tmp_path), "--n", "20", "--flavor", "cbis"]) == 0
    assert main(["demo-data", "--out", str(tmp_path), "--n", "25", "--flavor", "cbis"]) == 2
    assert "other parameters" in capsys.readouterr().err


def test_cli_errors_are_one_clear_line(capsys):
    assert main(["config", "--cfg", "configs/demo.yaml", "data.demo.flavr=cbis"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'data.demo.flavor'" in err and "Traceback" not in err
    assert main(["demo-data", "--out", "/tmp/unused", "--n", "3"]) == 2


@pytest.mark.parametrize("command", ["config", "demo-data", "inspect", "shards", "verify", "pipeline", "teachers",
                                     "softlabels", "train", "eval", "report"])
def test_every_command_has_help(command):
    result = kdscale(command, "--help")
    assert result.returncode == 0 and "usage: kdscale" in result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^bash (\S+)", readme.split("```")[1], flags=re.M)
    assert commands == ["launch/demo.sh", "tests/run.sh"]
    assert "bash tests/run.sh" in (REPO / ".ci" / "run").read_text()
