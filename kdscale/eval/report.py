"""The evaluation report: HTML + Markdown from the files ``kdscale eval`` wrote.

Input layout (``eval_dir``)::

    <eval_dir>/<RUN>/<split>/evaluation.json   # kdscale.eval.analysis.evaluate(...) + optional
                                               #   "robustness", "localization", "info"
    <eval_dir>/<RUN>/<split>/predictions.csv   # optional: ROC curves are drawn from it
    <eval_dir>/comparisons.json                # optional: a list of analysis.compare(...) outputs

Output (``out_dir``): ``report.html``, ``report.md`` and ``figures/*.png``. The HTML inlines every
figure as a base64 ``data:`` URI, so the one file is self-contained (it can be mailed or
archived alone); the Markdown references the same figures as ``figures/<name>.png``.

Sections (HTML element ids): ``summary``, ``comparisons``, ``references`` (students, teachers,
ensembles and oracle ceilings per label side by side), ``per-label``, ``cohorts``,
``robustness``, ``utilization``, ``subgroups``, ``calibration``, ``localization``, ``runs``.
A section whose inputs are missing says so instead of disappearing. The report holds aggregate
numbers, label names and demographic group names only: no sample keys, patient ids or report
text (predictions.csv is read for the ROC curves and nothing from it is printed).
"""
from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence

from kdscale.eval.predictions import MODALITIES, read_predictions
from kdscale.io.atomic import write_text_atomic

__all__ = ["RunResult", "discover_runs", "render_report", "results_table", "SECTION_IDS"]

SECTION_IDS = ("summary", "comparisons", "references", "per-label", "cohorts", "robustness",
               "utilization", "subgroups", "calibration", "localization", "modalities", "runs")
SUMMARY_COHORTS = ("paired", "partial", "all")
MISSING = "–"


# ----------------------------------------------------------------------------- inputs

@dataclass
class RunResult:
    """One ``<RUN>/<split>/evaluation.json`` and where it lies."""

    name: str
    split: str
    directory: Path
    evaluation: dict

    @property
    def label(self) -> str:
        return f"{self.name} ({self.split})"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.name}_{self.split}")

    @property
    def info(self) -> dict:
        return self.evaluation.get("info") or {}

    @property
    def main_head(self) -> str | None:
        return self.evaluation.get("main_head")

    @property
    def role(self) -> str:
        """student | teacher | ensemble | oracle (kdscale.eval.references); students by default."""
        return str(self.info.get("role") or "student")

    def main_cohorts(self) -> dict:
        """cohort -> head_metrics of the main head (empty when absent)."""
        return (self.evaluation.get("heads") or {}).get(self.main_head) or {}


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def discover_runs(eval_dir) -> list[RunResult]:
    """Every ``<RUN>/<split>/evaluation.json`` under ``eval_dir``, sorted by run then split."""
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise ValueError(f"evaluation directory {eval_dir} does not exist")
    runs = []
    for path in sorted(eval_dir.glob("*/*/evaluation.json")):
        evaluation = _load_json(path)
        if not isinstance(evaluation, dict):
            raise ValueError(f"{path}: expected a JSON object")
        runs.append(RunResult(path.parent.parent.name, path.parent.name, path.parent, evaluation))
    if not runs:
        raise ValueError(f"no <RUN>/<split>/evaluation.json under {eval_dir}")
    return runs


def _leakage(eval_dir: Path) -> list[dict]:
    """``leakage.json`` (kdscale eval): label-leakage warnings of the run's teachers."""
    path = eval_dir / "leakage.json"
    if not path.is_file():
        return []
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of teacher warnings")
    return [w for w in data if isinstance(w, dict)]


def _comparisons(eval_dir: Path) -> list[dict]:
    path = eval_dir / "comparisons.json"
    if not path.is_file():
        return []
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of comparisons")
    return [c for c in data if isinstance(c, dict)]


# ----------------------------------------------------------------------------- formatting

def _num(v, digits: int = 3) -> str:
    if v is None or isinstance(v, bool):
        return MISSING if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(entry, digits: int = 3) -> str:
    """``value [low, high]`` of a ``{"value", "low", "high"}`` dict (dashes where undefined)."""
    if not isinstance(entry, Mapping) or entry.get("value") is None:
        return MISSING
    low, high = entry.get("low"), entry.get("high")
    if low is None or high is None:
        return _num(entry["value"], digits)
    return f"{_num(entry['value'], digits)} [{_num(low, digits)}, {_num(high, digits)}]"


def _pvalue(p) -> str:
    if p is None:
        return MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _params(info: Mapping) -> str:
    for key in ("params", "parameters", "n_params", "num_parameters"):
        if info.get(key) is not None:
            return _num(info[key])
    return MISSING


# ----------------------------------------------------------------------------- document model

@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path          # the PNG in out_dir/figures
    caption: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Heading:
    """A sub-heading inside a section (one per run)."""

    text: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)

    def note_if_empty(self, text: str) -> Section:
        if not self.blocks:
            self.blocks.append(Paragraph(text))
        return self


# ----------------------------------------------------------------------------- sections

ROLE_GROUPS = (("students", ("student",)), ("teachers and ensembles", ("teacher", "ensemble")),
               ("ceilings (oracle, Bayes-optimal scores)", ("oracle",)))


def _ordered(runs: Sequence[RunResult]) -> list[RunResult]:
    """Students, then teachers and ensembles, then ceilings (each in discovery order)."""
    return [r for _, roles in ROLE_GROUPS for r in runs if r.role in roles] + \
        [r for r in runs if r.role not in {x for _, roles in ROLE_GROUPS for x in roles}]


def _summary(runs: Sequence[RunResult]) -> Section:
    headers = ["run", "role", "method", "params", "head"]
    for cohort in SUMMARY_COHORTS:
        headers += [f"AUROC {cohort}", f"AUPRC {cohort}", f"AUROC signal {cohort}"]
    rows = []
    for run in _ordered(runs):
        by_cohort = run.main_cohorts()
        row = [run.label, run.role, str(run.info.get("method", MISSING)), _params(run.info),
               str(run.main_head or MISSING)]
        for cohort in SUMMARY_COHORTS:
            m = by_cohort.get(cohort) or {}
            row += [_ci(m.get("auroc_macro")), _ci(m.get("auprc_macro")),
                    _ci((m.get("signal") or {}).get("auroc_macro"))]
        rows.append(row)
    headers, rows = _drop_empty_columns(headers, rows, keep=5)
    caption = ("Main head, macro over labels, [95% CI] from a patient-level bootstrap stratified "
               "per label (docs/eval.md). signal = macro over eval.signal_labels only. "
               "paired = image and EHR present; partial = EHR present; all = every sample. "
               "Teachers and ensembles are scored from their soft labels, ceilings from the "
               "oracle scores, on the samples each one covers.")
    section = Section("summary", "Summary", [Table(headers, rows, caption)])
    warned = [(run.label, w) for run in runs for w in (run.evaluation.get("bootstrap_warnings") or [])]
    if warned:
        section.blocks.append(Paragraph(
            f"Warning: {len(warned)} bootstrap interval(s) are unreliable (too many resamples "
            f"dropped, or widened to reach their estimate): "
            + "; ".join(f"{label}: {w}" for label, w in warned[:10])
            + (" …" if len(warned) > 10 else "")))
    return section


def _references(runs: Sequence[RunResult]) -> Section:
    """Per-label AUROC of every row (students, teachers, ensembles, ceilings) side by side."""
    section = Section("references", "Students, teachers and ceilings per label (AUROC)")
    ordered = [r for r in _ordered(runs) if r.main_cohorts()]
    if len({r.role for r in ordered}) < 2:
        return section.note_if_empty("No reference rows (teachers, ensembles or oracle ceilings) "
                                     "were evaluated: eval.teachers, eval.oracle_scores.")
    splits = list(dict.fromkeys(r.split for r in ordered))
    for split, cohort in [(sp, c) for sp in splits for c in SUMMARY_COHORTS]:
        shown = [r for r in ordered if r.split == split and cohort in r.main_cohorts()]
        if not shown:
            continue
        names: list[str] = []
        for r in shown:
            names += [n for n in r.main_cohorts()[cohort].get("labels", {}) if n not in names]
        signal = next((r.main_cohorts()[cohort]["signal"]["labels"] for r in shown
                       if r.main_cohorts()[cohort].get("signal")), [])
        rows = []
        for name in names:
            row = [name + (" *" if name in signal else "")]
            for r in shown:
                lab = r.main_cohorts()[cohort].get("labels", {}).get(name, {})
                row.append(_num((lab.get("auroc") or {}).get("value")))
            rows.append(row)
        if signal:
            rows.append([f"macro, {len(signal)} signal labels"]
                        + [_ci((r.main_cohorts()[cohort].get("signal") or {}).get("auroc_macro"))
                           for r in shown])
        rows.append([f"macro, all labels"] + [_ci(r.main_cohorts()[cohort].get("auroc_macro"))
                                              for r in shown])
        rows.append(["n"] + [_num(r.main_cohorts()[cohort].get("n")) for r in shown])
        section.blocks += [Heading(f"{split} split, cohort {cohort}"),
                           Table(["label"] + [f"{r.name} ({r.role})" for r in shown], rows,
                                 "AUROC per label of each row's main head; * = signal label "
                                 "(eval.signal_labels); macro rows with [95% CI]. Each row is "
                                 "scored on the samples of the cohort it covers (n).")]
    return section.note_if_empty("No reference rows.")


def _drop_empty_columns(headers: list[str], rows: list[list[str]], keep: int):
    """Leave out metric columns that are empty for every run (e.g. paired/partial cohorts of an
    image-only task), keeping the first ``keep`` descriptive columns."""
    cols = [j for j in range(len(headers))
            if j < keep or any(r[j] != MISSING for r in rows)]
    return [headers[j] for j in cols], [[r[j] for j in cols] for r in rows]


def _comparisons_section(comparisons: Sequence[dict]) -> Section:
    section = Section("comparisons", "Paired comparisons")
    if comparisons:
        rows = [[f"{c.get('run_a', '?')} / {c.get('head_a', '?')}",
                 f"{c.get('run_b', '?')} / {c.get('head_b', '?')}", _labels_cell(c.get("labels")),
                 str(c.get("cohort", "all")),
                 _num(c.get("n")), _num(c.get("n_patients")),
                 *_diff_cells(c.get("auroc_macro")), *_diff_cells(c.get("auprc_macro"))]
                for c in comparisons]
        section.blocks.append(Table(
            ["A", "B", "labels", "cohort", "n", "patients", "Δ macro AUROC (A − B)", "p", "Δ macro AUPRC",
             "p"], rows, "Paired patient-level bootstrap on the samples both runs cover; "
                         "two-sided bootstrap p-value; labels: the macro's labels (every label, or "
                         "eval.signal_labels)."))
    return section.note_if_empty("No comparisons.json: no paired comparison was run.")


def _labels_cell(labels) -> str:
    """'all', or how many labels a comparison's macro is over (eval.signal_labels)."""
    return "all" if labels in (None, "all") else f"{len(labels)} signal"


def _diff_cells(entry) -> list[str]:
    """``diff [low, high]`` and the p-value of one paired_bootstrap_diff result."""
    if not isinstance(entry, Mapping):
        return [MISSING, MISSING]
    diff = {"value": entry.get("diff"), "low": entry.get("low"), "high": entry.get("high")}
    return [_ci(diff), _pvalue(entry.get("p_value"))]


def _per_label(runs: Sequence[RunResult], figures: FigureMaker) -> Section:
    section = Section("per-label", "Per-label results (main head)")
    for run in runs:
        by_cohort = run.main_cohorts()
        shown = [c for c in SUMMARY_COHORTS if c in by_cohort]
        if not shown:
            continue
        names = list(by_cohort[shown[0]].get("labels", {}))
        headers = ["label", "prevalence", "n pos"]
        headers += [f"{metric} {c}" for c in shown for metric in ("AUROC", "AUPRC")]
        rows = []
        for name in names:
            first = by_cohort[shown[0]]["labels"][name]
            row = [name, _num(first.get("prevalence")), _num(first.get("n_pos"))]
            for c in shown:
                lab = by_cohort[c].get("labels", {}).get(name, {})
                row += [_ci(lab.get("auroc")), _ci(lab.get("auprc"))]
            rows.append(row)
        section.blocks += [Heading(run.label),
                           Table(headers, rows, f"Head {run.main_head}; prevalence and positives "
                                                f"in cohort {shown[0]}.")]
        fig = figures.roc(run)
        if fig:
            section.blocks.append(fig)
    return section.note_if_empty("No run has per-label results.")


def _cohorts(runs: Sequence[RunResult]) -> Section:
    section = Section("cohorts", "Heads and cohorts")
    definitions = {}
    for run in runs:
        for name, c in (run.evaluation.get("cohorts") or {}).items():
            definitions.setdefault(name, c.get("definition", ""))
    if definitions:
        section.blocks.append(Table(["cohort", "definition"],
                                    [[k, v] for k, v in definitions.items()]))
    presence = [[run.label, _num(run.evaluation.get("n"))] + [_num((run.evaluation["presence"]).get(m))
                                                             for m in MODALITIES]
                for run in runs if isinstance(run.evaluation.get("presence"), Mapping)]
    if presence:
        section.blocks.append(Table(["run", "samples", *(f"with {m}" for m in MODALITIES)], presence,
                                    "Samples holding each modality as stored (a student that does not read "
                                    "the report or tabular data still counts the samples that have them)."))
    for run in runs:
        heads = run.evaluation.get("heads") or {}
        multiclass = run.evaluation.get("task") == "multiclass"
        headers = ["head", "cohort", "n", "patients", "macro AUROC", "macro AUPRC", "micro AUROC",
                   "micro AUPRC"] + (["accuracy", "macro F1"] if multiclass else [])
        rows = []
        for head, by_cohort in heads.items():
            for cohort, m in by_cohort.items():
                row = [head, cohort, _num(m.get("n")), _num(m.get("n_patients")),
                       _ci(m.get("auroc_macro")), _ci(m.get("auprc_macro")),
                       _ci(m.get("auroc_micro")), _ci(m.get("auprc_micro"))]
                if multiclass:
                    row += [_ci(m.get("accuracy")), _ci(m.get("f1_macro"))]
                rows.append(row)
        if rows:
            section.blocks += [Heading(run.label), Table(headers, rows)]
    return section.note_if_empty("No head metrics.")


def _robustness(runs: Sequence[RunResult], figures: FigureMaker) -> Section:
    section = Section("robustness", "Robustness to missing modalities")
    for run in runs:
        rob = run.evaluation.get("robustness")
        if not isinstance(rob, Mapping) or not rob.get("conditions"):
            continue
        rows = [[name, str(c.get("kind", "")), _num(c.get("coverage")), _num(c.get("n_covered")),
                 _ci(c.get("auroc_macro")), _ci(c.get("auprc_macro"))]
                for name, c in rob["conditions"].items()]
        section.blocks += [Heading(run.label),
                           Table(["condition", "kind", "coverage", "n covered", "macro AUROC",
                                  "macro AUPRC"], rows,
                                 f"Head {rob.get('head', '?')}; coverage = share of the labelled "
                                 f"samples the head covers; metrics on the covered samples.")]
        section.blocks.append(figures.robustness(run, rob))
    return section.note_if_empty("No robustness results (run kdscale eval with conditions).")


def _utilization(runs: Sequence[RunResult]) -> Section:
    section = Section("utilization", "Modality utilization")
    rows = []
    for run in runs:
        u = run.evaluation.get("utilization")
        if isinstance(u, Mapping):
            rows.append([run.label, _num(u.get("n_paired")), _num(u.get("m_ab")),
                         _num(u.get("m_a")), _num(u.get("m_b")), _num(u.get("u_b_given_a")),
                         _num(u.get("u_a_given_b")), _num(u.get("d_util")),
                         _num(u.get("d_util_above_chance"))])
    if rows:
        section.blocks.append(Table(
            ["run", "n paired", "M(A,B) fusion", "M(A) image", "M(B) ehr", "u(B|A)", "u(A|B)",
             "d_util", "d_util above chance"], rows,
            "Macro AUROC on the paired samples; d_util = u(A|B) − u(B|A) = (M(A) − M(B)) / "
            "M(A,B), A = image, B = EHR; > 0: the fused model relies more on the image."))
    return section.note_if_empty("No run has fusion, image and ehr heads.")


def _subgroups(runs: Sequence[RunResult], figures: FigureMaker) -> Section:
    section = Section("subgroups", "Demographic subgroups (main head)")
    for run in runs:
        sg = run.evaluation.get("subgroups")
        attributes = (sg or {}).get("attributes") if isinstance(sg, Mapping) else None
        if not attributes:
            warnings = sg.get("warnings") if isinstance(sg, Mapping) else None
            if warnings:
                section.blocks += [Heading(run.label), *(Paragraph(f"Warning: {w}") for w in warnings)]
            continue
        rows = []
        for attribute, entry in attributes.items():
            for group, g in (entry.get("groups") or {}).items():
                flag = "too small: " + "; ".join(g.get("reasons", [])) if g.get("too_small") else ""
                rows.append([attribute, group, _num(g.get("n")), _num(g.get("n_patients")),
                             _ci(g.get("auroc_macro")), _ci(g.get("auprc_macro")), flag])
        counts = ", ".join(f"{name} {_num(entry.get('n_known'))} of {_num(entry.get('n'))}"
                           for name, entry in attributes.items() if "n_known" in entry)
        section.blocks.append(Heading(run.label))
        if counts:
            section.blocks.append(Paragraph(f"Samples with a value: {counts}."))
        section.blocks += [Paragraph(f"Warning: {w}") for w in sg.get("warnings") or []]
        section.blocks += [Table(["attribute", "group", "n", "patients", "macro AUROC",
                                  "macro AUPRC", "flag"], rows,
                                 f"Groups flagged too small have fewer than "
                                 f"{sg.get('min_group_size', '?')} samples or a label without "
                                 f"positives; read their numbers with care.")]
        section.blocks.append(figures.subgroups(run, sg))
    return section.note_if_empty("No demographic columns in the predictions.")


def _calibration(runs: Sequence[RunResult], figures: FigureMaker) -> Section:
    section = Section("calibration", "Calibration (main head)")
    for run in runs:
        cal = run.evaluation.get("calibration")
        if not isinstance(cal, Mapping) or "reliability" not in cal:
            continue
        rows = [["pooled", _num(cal.get("ece_pooled"))], ["macro", _num(cal.get("ece_macro"))]]
        rows += [[name, _num(v)] for name, v in (cal.get("ece") or {}).items()]
        section.blocks += [Heading(run.label),
                           Table(["label", "ECE"], rows,
                                 f"Expected calibration error, {cal.get('n_bins', '?')} "
                                 f"equal-width bins; pooled = all (sample, label) entries.")]
        section.blocks.append(figures.reliability(run, cal))
    return section.note_if_empty("No calibration results.")


LOCALIZATION_COLUMNS = (("iou", "IoU"), ("fpr_pixel", "FPR (pixels)"), ("fpr_area", "FPR (area)"),
                        ("pointing_game", "pointing game"), ("detection_auroc", "pixel AUROC"))


def _loc_cells(summary: Mapping) -> list[str]:
    cells = []
    for key, _ in LOCALIZATION_COLUMNS:
        v = summary.get(key)
        cells.append(_ci({"value": v.get("mean", v.get("value")), "low": v.get("low", v.get("ci_low")),
                          "high": v.get("high", v.get("ci_high"))}) if isinstance(v, Mapping) else MISSING)
    return cells


def _localization(runs: Sequence[RunResult], figures: FigureMaker, eval_dir: Path) -> Section:
    section = Section("localization", "Localization of attention maps")
    for run in runs:
        loc = run.evaluation.get("localization")
        if not isinstance(loc, Mapping):
            continue
        methods = loc.get("methods") if isinstance(loc.get("methods"), Mapping) else {}
        if not methods:              # an older evaluation.json: the primary method's metrics only
            methods = {str(loc.get("primary_method", "map")): loc}
        rows = [[name, "model", *_loc_cells(m)] for name, m in methods.items()]
        refs = loc.get("references") if isinstance(loc.get("references"), Mapping) else {}
        rows += [[name, "reference", *_loc_cells(m)] for name, m in refs.items()]
        n = loc.get("n", loc.get("n_images"))
        area = loc.get("area_fraction") if isinstance(loc.get("area_fraction"), Mapping) else {}
        caption = (f"{_num(n)} images; mean [95% CI over images]; threshold "
                   f"{_num(loc.get('threshold'))} on min-max normalised maps.")
        if area.get("mean") is not None:
            caption += (f" The regions cover {100 * area['mean']:.1f}% of the crop on average "
                        f"(min {100 * area['min']:.1f}%, max {100 * area['max']:.1f}%).")
        if refs:
            caption += (" Reference rows, same images and metrics: "
                        + "; ".join(f"{k}: {v}" for k, v in (loc.get("definitions") or {}).items())
                        + ". A model row that does not beat them has not localized anything.")
        section.blocks += [Heading(run.label),
                           Table(["map", "kind", *[c for _, c in LOCALIZATION_COLUMNS]], rows,
                                 caption)]
        overlay = loc.get("overlay_png")
        if overlay:
            fig = figures.copy_png(run, eval_dir / overlay, "overlay",
                                   f"{run.label}: attention maps (colour) and lesion boxes (green)")
            if fig:
                section.blocks.append(fig)
    return section.note_if_empty("No localization results.")


def _runs_section(runs: Sequence[RunResult]) -> Section:
    rows = [[run.label, str(run.info.get("student", MISSING)),
             str(run.info.get("method", MISSING)), _params(run.info), _num(run.info.get("seed")),
             str(run.info.get("checkpoint", MISSING)), _num(run.evaluation.get("n_boot")),
             _num(run.evaluation.get("seed"))]
            for run in runs]
    return Section("runs", "Runs", [Table(["run", "student", "method", "params", "train seed",
                                           "checkpoint", "bootstrap resamples", "bootstrap seed"],
                                          rows)])


# ----------------------------------------------------------------------------- figures

class FigureMaker:
    """Draws figures into ``out_dir/figures`` (plots imported lazily: matplotlib is slow)."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, run: RunResult, kind: str) -> Path:
        return self.dir / f"{run.slug}_{kind}.png"

    def roc(self, run: RunResult) -> Figure | None:
        csv_path = run.directory / "predictions.csv"
        if not csv_path.is_file() or not run.main_head:
            return None
        # matplotlib (eval.plots): ~1.2 s import (measured), paid only when figures are drawn
        from kdscale.eval.plots import roc_curves
        preds = read_predictions(csv_path)
        if run.main_head not in preds.heads:
            return None
        path = roc_curves(preds, run.main_head, self._path(run, "roc"))
        return Figure(path, f"{run.label}: ROC curves of head {run.main_head}, all samples.")

    def robustness(self, run: RunResult, section: Mapping) -> Figure:
        # matplotlib (eval.plots): ~1.2 s import (measured), paid only when figures are drawn
        from kdscale.eval.plots import robustness_curve
        path = robustness_curve(section, self._path(run, "robustness"))
        return Figure(path, f"{run.label}: macro AUROC vs modality removal rate.")

    def subgroups(self, run: RunResult, section: Mapping) -> Figure:
        # matplotlib (eval.plots): ~1.2 s import (measured), paid only when figures are drawn
        from kdscale.eval.plots import subgroup_bars
        path = subgroup_bars(section, self._path(run, "subgroups"))
        return Figure(path, f"{run.label}: macro AUROC per group (hatched: too small).")

    def reliability(self, run: RunResult, section: Mapping) -> Figure:
        # matplotlib (eval.plots): ~1.2 s import (measured), paid only when figures are drawn
        from kdscale.eval.plots import reliability_diagram
        path = reliability_diagram(section, self._path(run, "reliability"))
        return Figure(path, f"{run.label}: reliability diagram (pooled over labels).")

    def copy_png(self, run: RunResult, src: Path, kind: str, caption: str) -> Figure | None:
        if not src.is_file():
            return None
        dst = self._path(run, kind)
        dst.write_bytes(src.read_bytes())
        return Figure(dst, caption)


# ----------------------------------------------------------------------------- rendering

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;
color:#222;max-width:1400px}
h1{font-size:1.6em}h3{font-size:1.05em;margin-bottom:.2em}
h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2}p.caption{color:#555;font-size:.8em;margin:.2em 0}
figure{margin:.5em 0 1.5em}figcaption{color:#555;font-size:.85em}img{max-width:100%}
nav a{margin-right:1em}
"""


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in t.rows)
    # a paragraph rather than <caption>: a caption wraps to the width of a narrow table
    caption = f'<p class="caption">{html.escape(t.caption)}</p>' if t.caption else ""
    return f"{caption}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_block(block) -> str:
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Figure):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" '
                f'alt="{html.escape(block.caption)}"><figcaption>{html.escape(block.caption)}'
                f"</figcaption></figure>")
    if isinstance(block, Heading):
        return f"<h3>{html.escape(block.text)}</h3>"
    return f"<p>{html.escape(block.text)}</p>"


def _to_html(title: str, sections: Sequence[Section]) -> str:
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    parts = [f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>'
             + "".join(_html_block(b) for b in s.blocks) + "</section>" for s in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>" + "\n".join(parts)
            + "</body></html>\n")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block, out_dir: Path) -> str:
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                 "|" + "|".join("---" for _ in block.headers) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        if block.caption:
            lines += ["", f"*{_md_cell(block.caption)}*"]
        return "\n".join(lines)
    if isinstance(block, Figure):
        rel = block.path.relative_to(out_dir).as_posix()
        return f"![{_md_cell(block.caption)}]({rel})\n\n*{_md_cell(block.caption)}*"
    if isinstance(block, Heading):
        return f"### {block.text}"
    return block.text


def _to_markdown(title: str, sections: Sequence[Section], out_dir: Path) -> str:
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f'<a id="{s.id}"></a>\n\n## {s.title}')
        parts += [_md_block(b, out_dir) for b in s.blocks]
    return "\n\n".join(parts) + "\n"


def _sections(eval_dir: Path, out_dir: Path) -> list[Section]:
    runs = discover_runs(eval_dir)
    figures = FigureMaker(out_dir)
    summary = _summary(runs)
    # label leakage of a teacher undermines every distilled number: said first, in the summary
    summary.blocks[:0] = [Paragraph(f"Warning: teacher {w.get('teacher', '?')}: possible label leakage: "
                                    f"{w.get('warning', '')}") for w in _leakage(eval_dir)]
    return [summary, _comparisons_section(_comparisons(eval_dir)), _references(runs),
            _per_label(runs, figures), _cohorts(runs), _robustness(runs, figures),
            _utilization(runs), _subgroups(runs, figures), _calibration(runs, figures),
            _localization(runs, figures, eval_dir), _modalities_section(runs), _runs_section(runs)]


def _modalities_section(runs) -> Section:
    """The report's "Modalities and classes" section (kind multi / multiclass, computed by
    kdscale.eval.modality_eval): per kind-multi run, its parameters by module, the metrics per
    modality subset, N-modality d_util, and for a multiclass task the confusion matrix of the
    routed head."""
    section = Section("modalities", "Modalities, parameters and classes")
    for run in runs:
        ev = run.evaluation
        if not any(k in ev for k in ("modality_cohorts", "parameter_breakdown", "confusion_matrix")):
            continue
        section.blocks.append(Heading(run.label))
        parts = ev.get("parameter_breakdown") or {}
        if parts:
            section.blocks.append(Table(["module", "parameters"], [[k, f"{v:,}"] for k, v in parts.items()],
                                        "Parameters of the modules actually built; the parts sum to the total."))
        multiclass = ev.get("task") == "multiclass"
        rows = []
        for cohort, entry in (ev.get("modality_cohorts") or {}).items():
            if entry.get("skipped"):
                rows.append([cohort, _num(entry.get("n")), "-", entry["skipped"], "", ""] + (["", ""] if multiclass else []))
                continue
            for head, m in entry.get("heads", {}).items():
                row = [cohort, _num(entry.get("n")), head, _ci(m.get("auroc_macro")), _ci(m.get("auprc_macro")),
                       _num(m.get("n"))]
                if multiclass:
                    row += [_ci(m.get("accuracy")), _ci(m.get("f1_macro"))]
                rows.append(row)
        if rows:
            section.blocks.append(Table(
                ["modalities present", "n", "head", "macro AUROC", "macro AUPRC", "n covered"]
                + (["accuracy", "macro F1"] if multiclass else []), rows,
                "Every combination of the student's modalities that occurs in the split (exactly these present)."))
        util = ev.get("utilization_n")
        if util:
            section.blocks.append(Table(["quantity", "value"], [[k, _num(v)] for k, v in util.items()],
                                        "d_util over N modalities, AUROC above chance (docs/losses.md)."))
        cm = ev.get("confusion_matrix")
        if cm:
            classes = list(cm["classes"])
            section.blocks.append(Table(["true \\ predicted", *classes],
                                        [[c, *[str(v) for v in row]] for c, row in zip(classes, cm["counts"])],
                                        f"Confusion matrix of the {cm['head']} head (argmax of the class probabilities)."))
    return section.note_if_empty("No run over a configurable set of modalities.")


def render_report(eval_dir, out_dir, title: str = "kdscale evaluation report") -> dict:
    """Write ``out_dir/report.html`` (figures inlined), ``out_dir/report.md`` and
    ``out_dir/figures/*.png``; returns ``{"html": Path, "markdown": Path}``."""
    eval_dir, out_dir = Path(eval_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = _sections(eval_dir, out_dir)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    write_text_atomic(html_path, _to_html(title, sections))   # a reader never sees half a report
    write_text_atomic(md_path, _to_markdown(title, sections, out_dir))
    return {"html": html_path, "markdown": md_path}


def results_table(eval_dir, width_cohorts: Sequence[str] = SUMMARY_COHORTS) -> str:
    """The console results table (plain text): macro AUROC [95% CI] of the students, the
    teachers and ensembles and the oracle ceilings per cohort, over the signal labels (when
    eval.signal_labels is set) and over all labels, then the paired comparisons."""
    eval_dir = Path(eval_dir)
    every = [r for r in _ordered(discover_runs(eval_dir)) if r.main_cohorts()]
    splits = list(dict.fromkeys(r.split for r in every))
    out = []
    for split in splits:                 # one set of blocks per evaluated split
        runs = [r for r in every if r.split == split]
        out += _table_blocks(runs, width_cohorts, f" ({split} split)" if len(splits) > 1 else "")
    comparisons = _comparisons(eval_dir)
    if comparisons:
        rows = [["paired comparison (A − B)", "labels", "cohort", "n", "Δ macro AUROC", "p"]]
        for c in comparisons:
            rows.append([f"{c.get('run_a', '?')} − {c.get('run_b', '?')}", _labels_cell(c.get("labels")),
                         str(c.get("cohort", "all")), _num(c.get("n")), *_diff_cells(c.get("auroc_macro"))])
        out.append(_plain(rows))
    notes = "[95% CI]: patient-level bootstrap, stratified per label (docs/eval.md)."
    if any(r.evaluation.get("bootstrap_warnings") for r in every):
        notes += " ! = unreliable intervals, see bootstrap_warnings in its evaluation.json."
    return "\n".join(out) + "\n" + notes + "\n"


def _table_blocks(runs: list[RunResult], width_cohorts: Sequence[str], suffix: str) -> list[str]:
    cohorts = [c for c in width_cohorts if any(c in r.main_cohorts() for r in runs)]
    blocks = []
    n_signal = max((len(((r.main_cohorts().get(c) or {}).get("signal") or {}).get("labels") or [])
                    for r in runs for c in cohorts), default=0)
    n_all = max((len(m.get("labels") or {}) for r in runs for m in r.main_cohorts().values()),
                default=0)
    if n_signal:
        blocks.append((f"macro AUROC over the {n_signal} signal labels{suffix}",
                       lambda m: (m.get("signal") or {}).get("auroc_macro")))
    blocks.append((f"macro AUROC over all {n_all} labels{suffix}", lambda m: m.get("auroc_macro")))
    out = []
    for title, pick in blocks:
        rows = [[title] + cohorts]
        for group, roles in ROLE_GROUPS:
            members = [r for r in runs if r.role in roles]
            if not members:
                continue
            rows.append([group] + [""] * len(cohorts))
            for r in members:
                flag = " !" if r.evaluation.get("bootstrap_warnings") else ""
                rows.append([f"  {r.name}/{r.main_head}{flag}"]
                            + [_ci(pick(r.main_cohorts().get(c) or {})) for c in cohorts])
        out.append(_plain(rows))
    return out


def _plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def report_run(cfg) -> dict:
    """Render the report of an evaluated run (``kdscale report``): reads only ``<run>/eval``, so it
    imports neither torch nor the stage modules."""
    run_dir = Path(cfg.run.out_dir)
    paths = render_report(run_dir / "eval", run_dir / "report")
    return {"html": str(paths["html"]), "markdown": str(paths["markdown"]), "table": results_table(run_dir / "eval")}
