"""An experiment's aggregate: per arm mean ± sd over seeds of every run's evaluation numbers, and a
paired bootstrap of each arm against the reference arm pooled over seeds.

Pooled paired bootstrap. For each seed s the two arms' main heads are aligned on the test samples
both cover (inside the cohort); only samples common to every seed are kept, so that one patient
resample applies to all seeds at once. The seeds' predictions are laid side by side as columns
(S x C "labels" sharing each sample's targets), so the macro AUROC over the columns is the mean
over seeds of each seed's macro AUROC, and kdscale.metrics.classification.paired_bootstrap_diff resamples
patients jointly over seeds: the interval describes the test-set uncertainty of the seed-averaged
difference (the seed-to-seed spread is the sd column).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from kdscale.eval.analysis import _patient_groups, _selection, _targets, label_columns, to_jsonable
from kdscale.eval.predictions import align, read_predictions
from kdscale.eval.report import Figure, Paragraph, Section, Table, _to_html, _to_markdown
from kdscale.io.atomic import write_json_atomic, write_text_atomic
from kdscale.metrics.classification import label_metrics, paired_bootstrap_diff

COHORTS = ("all", "paired")
LOCALIZATION_KEYS = ("iou", "fpr_pixel", "fpr_area", "pointing_game", "detection_auroc")


def _value(entry) -> Optional[float]:
    if isinstance(entry, dict):
        entry = entry.get("value", entry.get("mean"))
    return None if entry is None else float(entry)


def run_metrics(evaluation: dict, shortcut: Optional[dict] = None) -> dict:
    """The scalar numbers of one run's evaluation.json (+ shortcut.json) that an experiment
    aggregates, as {name: value or None}."""
    out: dict = {}
    main = evaluation["main_head"]
    heads = evaluation.get("heads") or {}
    for cohort in ("all", "paired", "partial"):
        m = (heads.get(main) or {}).get(cohort)
        if m:
            out[f"auroc_macro/{cohort}"] = _value(m.get("auroc_macro"))
            out[f"auprc_macro/{cohort}"] = _value(m.get("auprc_macro"))
            if isinstance(m.get("signal"), dict):   # eval.signal_labels: the labels with designed signal
                out[f"signal.auroc_macro/{cohort}"] = _value(m["signal"].get("auroc_macro"))
    for head, cohort in (("fusion", "paired"), ("image", "all"), ("ehr", "all")):
        m = (heads.get(head) or {}).get(cohort)
        if head != main and m:
            out[f"{head}.auroc_macro/{cohort}"] = _value(m.get("auroc_macro"))
    util = evaluation.get("utilization") or {}
    for key in ("d_util", "d_util_above_chance", "m_ab", "m_a", "m_b"):
        if key in util:
            out[f"util.{key}"] = _value(util[key])
    loc = evaluation.get("localization") or {}
    for key in LOCALIZATION_KEYS:
        if isinstance(loc.get(key), dict):
            out[f"loc.{key}"] = _value(loc[key])
    for key, value in ((shortcut or {}).get("summary") or {}).items():
        out[f"shortcut.{key}"] = _value(value)
    return out


def _mean_sd(values: list) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "n": len(vals)}


def _eval_dir(unit, split: str) -> Path:
    return unit.run_dir / "eval" / unit.arm / split


def pooled_paired_bootstrap(preds_ref: list, preds_arm: list, cohort: str, n_boot: int, seed: int = 0,
                            metric: str = "auroc_macro", labels: Optional[Sequence[str]] = None) -> dict:
    """Paired bootstrap of the reference minus the arm (lists of (Predictions, head), one pair per
    seed, in the same seed order), pooled over seeds as the module docstring describes.
    ``labels``: only these labels (e.g. eval.signal_labels) enter the macro."""
    per_seed = []
    for (pa, ha), (pb, hb) in zip(preds_ref, preds_arm):
        a, b = align(pa, pb)
        sel = _selection(a, ha, None if cohort == "all" else cohort) & _selection(b, hb, None)
        per_seed.append((a, b, ha, hb, sel))
    common = set.intersection(*({k for k, s in zip(a.keys, sel) if s} for a, _, _, _, sel in per_seed))
    if not common:
        raise ValueError(f"no sample in cohort {cohort!r} is covered by both arms in every seed")
    keys = sorted(common)
    ys, pas, pbs, groups = [], [], [], None
    for a, b, ha, hb, _ in per_seed:
        index = {k: i for i, k in enumerate(a.keys)}
        rows = np.array([index[k] for k in keys])
        y = _targets(a)[0][rows]
        if ys and not np.array_equal(np.nan_to_num(y, nan=-1), np.nan_to_num(ys[0], nan=-1)):
            raise ValueError("the seeds' test labels differ: seeds must share one test set to be pooled")
        ys.append(y)
        pas.append(np.asarray(a.heads[ha][0], np.float64)[rows])
        pbs.append(np.asarray(b.heads[hb][0], np.float64)[rows])
        groups = _patient_groups(a)[rows]
    if labels is not None:
        cols = label_columns(per_seed[0][0], labels)
        ys, pas, pbs = [y[:, cols] for y in ys], [p[:, cols] for p in pas], [p[:, cols] for p in pbs]
    y_all, pa_all, pb_all = np.hstack(ys), np.hstack(pas), np.hstack(pbs)
    d = paired_bootstrap_diff(y_all, pa_all, pb_all, groups=groups, metric=metric, n_resamples=n_boot,
                              seed=seed)
    return {"cohort": cohort, "metric": metric, "labels": "all" if labels is None else list(labels),
            "n": len(keys), "n_patients": int(len(np.unique(groups))),
            "seeds": len(per_seed), "reference_value": float(label_metrics(y_all, pa_all)[metric]),
            "arm_value": float(label_metrics(y_all, pb_all)[metric]), **d, "n_boot": n_boot}


def aggregate(exp, units: list, configs: dict) -> dict:
    """Per arm: per-seed metrics, mean ± sd; per non-reference arm and cohort: the pooled paired
    bootstrap vs the reference arm. Runs not evaluated yet are listed as missing."""
    arm_units = [u for u in units if u.kind == "arm"]
    per_run, preds, missing = {}, {}, []
    for u in arm_units:
        cfg = configs[u.run_dir]
        directory = _eval_dir(u, cfg.eval.split)
        path = directory / "evaluation.json"
        if not path.is_file():
            missing.append(str(path))
            continue
        evaluation = json.loads(path.read_text())
        shortcut_path = directory / "shortcut.json"
        shortcut = json.loads(shortcut_path.read_text()) if shortcut_path.is_file() else None
        per_run[(u.arm, u.seed)] = {"metrics": run_metrics(evaluation, shortcut),
                                    "main_head": evaluation["main_head"], "n": evaluation.get("n"),
                                    "evaluation": str(path)}
        preds[(u.arm, u.seed)] = (read_predictions(directory / "predictions.csv"), evaluation["main_head"])
    arms_present = [a.name for a in exp.arms if any(k[0] == a.name for k in per_run)]
    seeds = sorted({u.seed for u in arm_units})
    arms: dict = {}
    for name in arms_present:
        arm = exp.arm(name)
        runs = {s: per_run[(name, s)] for s in seeds if (name, s) in per_run}
        names = sorted({k for r in runs.values() for k in r["metrics"]})
        arms[name] = {"label": arm.label or name, "seeds": sorted(runs), "student": arm.student,
                      "metrics": {k: {**_mean_sd([r["metrics"].get(k) for r in runs.values()]),
                                      "per_seed": {str(s): r["metrics"].get(k) for s, r in runs.items()}}
                                  for k in names},
                      "evaluations": {str(s): r["evaluation"] for s, r in runs.items()}}
    comparisons = []
    ref = exp.reference
    signal = [list(cfg.eval.signal_labels) for cfg in configs.values() if cfg.eval.signal_labels][:1]
    label_sets = [None] + signal   # every label, then (when configured) the signal labels only
    for name in arms_present:
        if name == ref or ref not in arms:
            continue
        both = [s for s in seeds if (ref, s) in preds and (name, s) in preds]
        if not both:
            continue
        for cohort in COHORTS:
            for metric, labels in [(m, ls) for ls in label_sets for m in ("auroc_macro", "auprc_macro")]:
                try:
                    c = pooled_paired_bootstrap([preds[(ref, s)] for s in both], [preds[(name, s)] for s in both],
                                                cohort, exp.bootstrap, metric=metric, labels=labels)
                except ValueError as exc:   # e.g. an image-only arm has no paired cohort
                    comparisons.append({"reference": ref, "arm": name, "cohort": cohort, "metric": metric,
                                        "labels": "all" if labels is None else labels, "skipped": str(exc)})
                    continue
                # report arm minus reference (positive = the arm is better)
                comparisons.append({**c, "reference": ref, "arm": name, "seeds_pooled": both,
                                    "reference_value": c["reference_value"], "arm_value": c["arm_value"],
                                    "diff": -c["diff"], "low": -c["high"], "high": -c["low"]})
    return {"experiment": exp.name, "description": exp.description, "base": exp.base, "seeds": seeds,
            "reference": ref, "arms": arms, "comparisons": comparisons, "missing": missing,
            "sweep": exp.sweep_arm_names}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

HEADLINE = ("signal.auroc_macro/all", "signal.auroc_macro/paired", "auroc_macro/all", "auroc_macro/paired",
            "fusion.auroc_macro/paired", "image.auroc_macro/all",
            "ehr.auroc_macro/all", "util.d_util", "loc.iou", "loc.fpr_pixel", "loc.pointing_game",
            "loc.detection_auroc", "shortcut.marker_share", "shortcut.marker_share_marked",
            "shortcut.marker_share_unmarked", "shortcut.area_share", "shortcut.prob_gap")


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _arm_table(result: dict):
    present = [k for k in HEADLINE if any(k in a["metrics"] for a in result["arms"].values())]
    headers = ["arm", "seeds"] + present
    rows = []
    for name, arm in result["arms"].items():
        row = [f"{name} ({arm['label']})" if arm["label"] != name else name, ",".join(map(str, arm["seeds"]))]
        for k in present:
            m = arm["metrics"].get(k)
            row.append("–" if not m or m["mean"] is None else
                       f"{_fmt(m['mean'])} ± {_fmt(m['sd'])}" if m["sd"] is not None else _fmt(m["mean"]))
        rows.append(row)
    return Table(headers, rows, "Mean ± sd over seeds of each run's test-split number (main head unless a "
                                "head is named; /cohort = the cohort). util.d_util: MIND's utilization gap.")


def _seed_table(result: dict):
    present = {k for a in result["arms"].values() for k in a["metrics"]}
    key = next(k for k in ("signal.auroc_macro/paired", "auroc_macro/paired", "auroc_macro/all")
               if k in present or k == "auroc_macro/all")
    seeds = result["seeds"]
    rows = [[name] + [_fmt(arm["metrics"].get(key, {}).get("per_seed", {}).get(str(s))) for s in seeds]
            for name, arm in result["arms"].items()]
    return Table(["arm"] + [f"seed {s}" for s in seeds], rows, f"Every seed: {key}.")


def _comparison_table(result: dict):
    rows = []
    for c in result["comparisons"]:
        if "skipped" in c:
            continue
        labels = c.get("labels", "all")
        rows.append([c["arm"], c["cohort"], c["metric"], "all" if labels == "all" else f"{len(labels)} signal",
                     str(c["n"]), ",".join(map(str, c["seeds_pooled"])),
                     _fmt(c["reference_value"]), _fmt(c["arm_value"]),
                     f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]",
                     "–" if c["p_value"] is None else f"{c['p_value']:.3f}", str(c["n_resamples_used"])])
    return Table(["arm", "cohort", "metric", "labels", "n samples", "seeds pooled", result["reference"], "arm",
                  f"arm − {result['reference']} [95% CI]",
                  "p", "resamples used"], rows,
                 "Paired patient-level bootstrap pooled over seeds (one resample applies to every seed; the "
                 "difference is the seed-averaged macro metric).")


def _sweep_figure(result: dict, out_dir: Path):
    """d_util vs fusion AUROC (paired) for the sweep arms: MIND's utilization sensitivity."""
    # matplotlib (eval.plots): ~1.2 s import (measured), paid only when figures are drawn
    from kdscale.eval.plots import _save, plt

    points = []
    for name in result["sweep"]:
        arm = result["arms"].get(name)
        if not arm:
            continue
        du = arm["metrics"].get("util.d_util", {}).get("per_seed", {})
        au = arm["metrics"].get("util.m_ab", {}).get("per_seed", {})
        pts = [(du[s], au[s]) for s in du if du.get(s) is not None and au.get(s) is not None]
        if pts:
            points.append((name, arm["label"], pts))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, label, pts in points:
        x, y = np.array(pts).T
        line = ax.scatter(x, y, alpha=0.45, s=18)
        ax.scatter([x.mean()], [y.mean()], color=line.get_facecolor()[0], s=70, edgecolor="k",
                   label=label[:48])
    ax.set_xlabel("d_util = u(A|B) − u(B|A)  (paired test set)")
    ax.set_ylabel("fusion macro AUROC (paired test set)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    path = _save(fig, out_dir / "figures" / "d_util_vs_fusion_auroc.png")
    return Figure(path, "Utilization sensitivity: each small point one seed, large points the mean over seeds.")


def results_dir(out, name: str) -> Path:
    """Where an experiment's aggregate and report go: per experiment name, so that two
    experiments may share one out_dir (and with it the runs they have in common)."""
    return Path(out) / "results" / name


def render(exp, result: dict, out: Path) -> dict:
    report_dir = results_dir(out, exp.name)
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_dir / "aggregate.json"
    write_json_atomic(json_path, to_jsonable(result))
    arms = _arm_table(result)
    sections = [Section("arms", "Arms (mean ± sd over seeds)", [arms]),
                Section("seeds", "Every seed", [_seed_table(result)]),
                Section("comparisons", f"Each arm vs {result['reference']}", [_comparison_table(result)])]
    fig = _sweep_figure(result, report_dir)
    if fig is not None:
        sections.append(Section("utilization", "Utilization sensitivity (sweep)", [fig]))
    if result["missing"]:
        sections.append(Section("missing", "Runs not evaluated yet",
                                [Paragraph(f"{len(result['missing'])} run(s) have no evaluation.json yet.")]))
    title = f"kdscale experiment {exp.name}"
    html_path, md_path = report_dir / "report.html", report_dir / "report.md"
    write_text_atomic(html_path, _to_html(title, sections))
    write_text_atomic(md_path, _to_markdown(title, sections, report_dir))
    widths = [max(len(r[i]) for r in [arms.headers] + arms.rows) for i in range(len(arms.headers))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [arms.headers] + arms.rows)
    return {"json": json_path, "html": html_path, "markdown": md_path, "table": table}
