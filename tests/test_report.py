"""kdscale.eval.report and kdscale.eval.plots: a synthetic eval_dir with two runs, rendered and
checked in a real headless Chromium (tests/browser.py), plus figure and robustness checks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from browser import chromium_or_skip, dump_dom
from kdscale.eval.analysis import compare, evaluate, robustness
from kdscale.eval.plots import _roc_points, attention_overlays, roc_curves
from kdscale.eval.predictions import subset, write_predictions
from kdscale.eval.report import SECTION_IDS, render_report, results_table
from test_eval_analysis import make_predictions

N_BOOT = 50
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _drop(preds, head_names, rate, seed, main_head="routed"):
    """The same predictions with the given heads' coverage removed at ``rate`` and the main
    head's scores blurred with noise in proportion (as losing inputs would)."""
    out = subset(preds, np.arange(preds.n))
    rng = np.random.default_rng(seed)
    for h in head_names:
        p, m = out.heads[h]
        out.heads[h] = (p, m & (rng.random(preds.n) >= rate))
    p, m = out.heads[main_head]
    out.heads[main_head] = ((1 - 0.6 * rate) * p + 0.6 * rate * rng.random(p.shape), m)
    return out


def _write_run(eval_dir: Path, name: str, preds, main_head: str, info: dict, *,
               with_optional: bool) -> None:
    split_dir = eval_dir / name / "test"
    write_predictions(split_dir / "predictions.csv", preds)
    ev = evaluate(preds, main_head, n_boot=N_BOOT)
    ev["info"] = info
    if with_optional:
        conditions = {"full": preds, "drop:image": _drop(preds, ["image", "fusion"], 1.0, 0),
                      "random:0.25": _drop(preds, ["image", "ehr"], 0.25, 1),
                      "random:0.5": _drop(preds, ["image", "ehr"], 0.5, 2)}
        ev["robustness"] = robustness(conditions, main_head, n_boot=N_BOOT)
        rng = np.random.default_rng(0)
        images = rng.random((3, 32, 32))
        maps = np.zeros((3, 32, 32))
        maps[:, 8:16, 8:16] = 1.0
        overlay = attention_overlays(images, maps, [[(8, 8, 8, 8)], [(4, 4, 6, 6)], []],
                                     ["a", "b", "c"], split_dir / "overlay.png")
        ev["localization"] = {"iou": {"value": 0.42, "ci_low": 0.3, "ci_high": 0.5, "n": 3},
                              "pointing_game": {"mean": 0.66, "low": 0.3, "high": 1.0, "n": 3},
                              "n": 3, "overlay_png": str(overlay.relative_to(eval_dir))}
    (split_dir / "evaluation.json").write_text(json.dumps(ev, allow_nan=False))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    eval_dir, out_dir = root / "eval", root / "out"
    mind = make_predictions(n=220, seed=11)
    base = make_predictions(n=220, seed=11, signals={"routed": 0.2}, heads=("routed",))
    _write_run(eval_dir, "mind_small", mind, "routed",
               {"student": "mind", "method": "MIND", "params": 7514507, "seed": 0,
                "checkpoint": "runs/x/ckpt.pt"}, with_optional=True)
    _write_run(eval_dir, "baseline", base, "routed", {"method": "supervised"},
               with_optional=False)
    comparisons = [compare(mind, base, "routed", "routed", n_boot=N_BOOT, name_a="mind_small",
                           name_b="baseline", cohort="paired")]
    (eval_dir / "comparisons.json").write_text(json.dumps(comparisons, allow_nan=False))
    paths = render_report(eval_dir, out_dir)
    return {"eval_dir": eval_dir, "out_dir": out_dir, "paths": paths, "preds": mind}


def test_report_files_sections_and_no_patient_content(rendered):
    html_text = rendered["paths"]["html"].read_text()
    md_text = rendered["paths"]["markdown"].read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html_text
        assert f'<a id="{sid}"></a>' in md_text
    figures = sorted(p.name for p in (rendered["out_dir"] / "figures").glob("*.png"))
    assert "mind_small_test_roc.png" in figures and "mind_small_test_overlay.png" in figures
    assert "baseline_test_reliability.png" in figures
    for name in figures:
        data = (rendered["out_dir"] / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 400_000
        assert f"(figures/{name})" in md_text
    preds = rendered["preds"]
    for text in (html_text, md_text):
        # inlined figures are base64: random letters that may spell "p0"; look at the text only
        text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
        assert not any(k in text for k in preds.keys[:50])             # no sample keys
        assert not re.search(r"\bp\d+\b", text)                       # no patient ids
        assert "mind_small (test)" in text and "7,514,507" in text
        assert "Δ macro AUROC" in text
    assert "data:image/png;base64," in html_text and "figures/" not in html_text


def test_results_table_is_plain_text(rendered):
    text = results_table(rendered["eval_dir"])
    lines = text.splitlines()
    assert lines[0].startswith("macro AUROC over all") and set(lines[1]) <= {"-", " "}
    assert "paired" in lines[0] and "all" in lines[0]
    assert lines[2].startswith("students")
    assert any(line.startswith("  mind_small/routed") for line in lines)
    assert any(line.startswith("  baseline/routed") for line in lines)
    assert "<" not in text and max(len(line) for line in lines) < 120


def test_report_in_headless_chromium(rendered, tmp_path):
    chromium = chromium_or_skip()
    page = tmp_path / "check.html"
    # the probe runs after the load event: every <img> must have decoded to a real bitmap
    probe = ("<script>window.addEventListener('load', function () {"
             "var imgs = Array.from(document.images);"
             "var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });"
             "document.body.setAttribute('data-images-total', imgs.length);"
             "document.body.setAttribute('data-images-ok', ok.length);"
             "document.body.setAttribute('data-sections', Array.from("
             "document.querySelectorAll('section')).map(function (s) { return s.id; }).join(','));"
             "});</script>")
    page.write_text(rendered["paths"]["html"].read_text().replace("</body>", probe + "</body>"))
    dom = dump_dom(chromium, page)
    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    ok = int(re.search(r'data-images-ok="(\d+)"', dom).group(1))
    assert total >= 5 and ok == total
    sections = re.search(r'data-sections="([^"]*)"', dom).group(1).split(",")
    assert sections == list(SECTION_IDS)


def test_report_tolerates_missing_optional_sections(tmp_path):
    preds = make_predictions(n=80, heads=("image",))
    ev = evaluate(preds, "image", n_boot=20)
    for key in ("calibration", "subgroups", "cohorts"):
        del ev[key]
    run_dir = tmp_path / "eval" / "only" / "val"
    run_dir.mkdir(parents=True)
    (run_dir / "evaluation.json").write_text(json.dumps(ev))
    paths = render_report(tmp_path / "eval", tmp_path / "out")
    text = paths["html"].read_text()
    assert "No comparisons.json" in text and "No robustness results" in text
    assert "No run has fusion, image and ehr heads" in text
    assert all(f'id="{sid}"' in text for sid in SECTION_IDS)
    assert "AUROC paired" in text and "AUROC all" in text
    with pytest.raises(ValueError, match="no <RUN>/<split>/evaluation.json"):
        render_report(tmp_path / "out", tmp_path / "out2")
    (run_dir / "evaluation.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        render_report(tmp_path / "eval", tmp_path / "out")


def test_summary_drops_cohorts_no_run_has(tmp_path):
    preds = make_predictions(n=60, heads=("image",))
    preds.present = {"image": np.ones(60, bool)}                   # image-only task: no EHR
    run_dir = tmp_path / "only" / "test"
    run_dir.mkdir(parents=True)
    (run_dir / "evaluation.json").write_text(json.dumps(evaluate(preds, "image", n_boot=20)))
    header = results_table(tmp_path).splitlines()[0]
    assert header.split()[-1] == "all" and "paired" not in header and "partial" not in header


def test_report_states_subgroup_counts_warnings_and_stored_presence(tmp_path):
    """Issue 16 findings 1 and 6: the report says how many samples had each demographic
    attribute, warns when one is unknown for all, and counts every stored modality."""
    preds = make_predictions(n=80, heads=("image",))
    preds.meta["ethnicity"] = [""] * 80
    preds.present["tabular"] = np.arange(80) < 30
    run_dir = tmp_path / "eval" / "only" / "test"
    run_dir.mkdir(parents=True)
    ev = evaluate(preds, "image", n_boot=10, min_group_size=5)
    (run_dir / "evaluation.json").write_text(json.dumps(ev))
    md = render_report(tmp_path / "eval", tmp_path / "out")["markdown"].read_text()
    n = ev["subgroups"]["attributes"]["ethnicity"]["n"]
    assert f"ethnicity 0 of {n}" in md and "Warning: ethnicity: every one of the" in md
    assert "with report" in md and "with tabular" in md
    row = next(line for line in md.splitlines() if line.startswith("| only (test)") and "| 30 |" in line)
    assert f"| {int(preds.present['report'].sum())} |" in row


# ----------------------------------------------------------------------------- plots

def test_roc_points_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.3).astype(float)
    p = np.round(rng.random(200) * 10) / 10                       # heavy ties
    fpr, tpr = _roc_points(y, p)
    s_fpr, s_tpr, _ = roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, s_fpr)
    np.testing.assert_allclose(tpr, s_tpr)


def test_plots_write_small_pngs(tmp_path):
    preds = make_predictions(n=100, task="multiclass", labels=("a", "b", "c"), heads=("image",))
    path = roc_curves(preds, "image", tmp_path / "roc.png")
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size < 200_000
    rgb = np.random.default_rng(1).random((5, 16, 16, 3))
    out = attention_overlays(rgb, rgb[..., 0], [[(1, 1, 4, 4)]] * 5, None, tmp_path / "o.png",
                             ncols=2)
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="do not match"):
        attention_overlays(rgb, rgb[:, :8, :8, 0], [[]] * 5, None, tmp_path / "x.png")


def test_browser_helper_skips_or_fails_with_the_reason(monkeypatch):
    import browser

    monkeypatch.setattr(browser, "_find", lambda: None)
    monkeypatch.setattr(browser.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("KDSCALE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        browser.chromium_or_skip()
    monkeypatch.setenv("KDSCALE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="KDSCALE_REQUIRE_BROWSER=1"):
        browser.chromium_or_skip()


def test_report_rendering_imports_no_torch():
    """``kdscale report`` re-renders from ``<run>/eval`` alone: its module must not pull in torch
    (or the stage modules that evaluation needs)."""
    import subprocess
    import sys

    code = ("import sys; from kdscale.eval.report import report_run; "
            "loaded = sorted(m for m in ('torch', 'kdscale.eval.run_eval', 'kdscale.data.loader') if m in sys.modules); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
