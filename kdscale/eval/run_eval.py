"""`kdscale eval --run RUN_DIR`: run every trained student of a run on a split and write what the
report needs (docs/eval.md).

For each student ``<run>/students/<name>/student.pt``::

    <run>/eval/<name>/<split>/predictions.csv (+ .json)   every sample: labels, each head's probs
    <run>/eval/<name>/<split>/evaluation.json             analysis.evaluate + robustness + localization
    <run>/eval/<name>/<split>/attention.png               ViT attention / CNN Grad-CAM over boxes
    <run>/eval/comparisons.json                           paired bootstrap: reference vs each other

Missing-modality robustness re-runs the model on the same samples with a modality's presence
flag switched off (the student then routes to what is present; nothing is imputed), and with
each modality removed at random at the configured rates (seeded per sample key, so every
student loses the same samples). The report modality is privileged (teachers only): students
never read it, so "drop:report" is not a condition.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from kdscale.data.ingest import DataError
from kdscale.data.loader import build_loader
from kdscale.data.shards import shards_out_dir
from kdscale.data.tario import iter_members
from kdscale.data.transforms import letterbox_geometry
from kdscale.distill.student_training import build_task, load_student, student_dir, student_loader_config
from kdscale.distill.teacher_pass import softlabels_dir
from kdscale.distill.teachers import teachers_dir
from kdscale.eval.analysis import compare, evaluate, robustness, subgroup_counts_line, to_jsonable
from kdscale.eval.attention import grad_cam, to_image_maps, vit_attention_maps
from kdscale.eval.ci_checks import bootstrap_warnings
from kdscale.eval.localization import (_crop_offset, _resized_size, boxes_to_mask, localization_references,
                                       localization_summary, transform_boxes)
from kdscale.eval.modality_eval import (class_indices, confusion_matrix, removal_conditions, subset_cohort_metrics,
                                        utilization_from_predictions)
from kdscale.eval.predictions import Predictions, demographics, write_predictions
from kdscale.eval.references import (check_signal_labels, oracle_predictions, reference_evaluation, split_samples,
                                     teacher_predictions)
from kdscale.eval.report import report_run  # noqa: F401  (re-exported: pipeline, cli)
from kdscale.io.atomic import write_json_atomic

log = logging.getLogger(__name__)

STUDENT_MODALITIES = ("image", "ehr", "report", "tabular")   # random removal applies to these


# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------

def _keep_mask(keys: list[str], modality: str, condition: str, seed: int) -> np.ndarray:
    """Which samples keep ``modality`` under ``condition`` ("full", "drop:<m>", "random:<rate>";
    random removal is seeded per sample key, so every student loses the same samples)."""
    if condition.startswith("drop:"):
        return np.full(len(keys), condition != f"drop:{modality}")
    if condition.startswith("random:") and modality in STUDENT_MODALITIES:
        rate = float(condition.split(":", 1)[1])
        return np.array([_uniform(k, modality, seed) >= rate for k in keys], dtype=bool)
    return np.ones(len(keys), dtype=bool)


def _flags_under(keys: list[str], present: dict, condition: str, seed: int) -> dict:
    """The batch's presence flags (bool tensors) under ``condition``."""
    if condition == "full":
        return present
    return {m: torch.as_tensor(flag).bool() & torch.from_numpy(_keep_mask(keys, m, condition, seed))
            for m, flag in present.items()}


def _uniform(key: str, modality: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{modality}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _stored_presence(batch: dict) -> dict:
    """What each sample of the batch holds, from its stored record: the loader flags only the
    modalities it decoded (a student never loads the report or tabular data its teachers read),
    so those are taken from the record's own ``present`` (issue 16)."""
    records = batch["meta"]
    return {m: torch.as_tensor(flag).bool() | torch.tensor([bool((r.get("present") or {}).get(m)) for r in records],
                                                          dtype=torch.bool)
            for m, flag in batch["present"].items()}


def predict_split(model, task, loader, conditions: list[str], seed: int, label_task: str = "multilabel") -> dict:
    """{condition: Predictions} for every valid sample of ``loader``, one pass over the data. The
    model sees the loader's presence flags under each condition; each condition's recorded
    ``present`` is what the sample holds (its stored record) less what the condition removed."""
    acc = {c: {"heads": {}, "present": {}} for c in conditions}
    keys, patients, labels, meta = [], [], [], {"sex": [], "age": [], "ethnicity": []}
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            valid = batch["valid"].numpy().astype(bool)
            batch_keys = list(batch["key"])
            stored = _stored_presence(batch)
            for c in conditions:
                flags = _flags_under(batch_keys, batch["present"], c, seed)
                for m, flag in _flags_under(batch_keys, stored, c, seed).items():
                    acc[c]["present"].setdefault(m, []).append(np.asarray(flag, bool)[valid])
                for head, (probs, mask) in task.predict(model, {**batch, "present": flags}).items():
                    acc[c]["heads"].setdefault(head, []).append(
                        (probs.float().cpu().numpy()[valid], mask.cpu().numpy().astype(bool)[valid]))
            keys += [k for k, v in zip(batch_keys, valid) if v]
            labels.append(batch["labels"].numpy()[valid])
            for record, v in zip(batch["meta"], valid):
                if not v:
                    continue
                patients.append(str(record.get("patient_id", "")))
                for column, value in demographics(record.get("meta")).items():
                    meta[column].append(value)
    if not keys:
        raise ValueError("the evaluation split has no samples for this student")
    label_array = np.concatenate(labels).astype(np.float64)
    if label_task == "multiclass":   # one-hot in the shards -> class index column
        label_array = class_indices(label_array)
    out = {}
    for c in conditions:
        heads = {h: (np.concatenate([p for p, _ in parts]), np.concatenate([m for _, m in parts]))
                 for h, parts in acc[c]["heads"].items()}
        present = {m: np.concatenate(v) for m, v in acc[c]["present"].items()}
        out[c] = Predictions(keys=list(keys), patient_ids=list(patients), label_names=list(loader.index["label_names"]),
                             labels=label_array, heads=heads, present=present, meta=meta, task=label_task)
    return out


def _multi_sections(preds, student, model, ecfg) -> dict:
    """Kind multi: metrics per head on every modality subset in the data, N-modality d_util,
    the parameter breakdown, and (multiclass) the routed head's confusion matrix."""
    mods = list(student.model.modalities)
    out = {"modality_cohorts": subset_cohort_metrics(preds, mods, [h for h in preds.heads], n_boot=ecfg.bootstrap,
                                                     seed=ecfg.seed, min_group_size=ecfg.min_group_size),
           "parameter_breakdown": model.parameter_breakdown()}
    if len(mods) > 1 and student.model.aux_heads:
        out["utilization_n"] = utilization_from_predictions(preds, mods)
    if preds.task == "multiclass":
        p, m = preds.heads["routed"]
        out["confusion_matrix"] = {"head": "routed", "classes": list(preds.label_names),
                                   "counts": confusion_matrix(preds.labels[m, 0], np.asarray(p)[m],
                                                              len(preds.label_names))}
    return out


# ---------------------------------------------------------------------------------------------
# Attention-map localization (image students)
# ---------------------------------------------------------------------------------------------

def localization(model, info: dict, loader, loader_cfg, out_png: Path, threshold: float, n_boot: int,
                 seed: int, max_overlay: int = 8) -> Optional[dict]:
    """ViT: last-layer CLS attention and attention rollout; CNN: Grad-CAM. Against the union of
    each test image's boxes after the loader's resize + crop. None when no test image has a box."""
    # matplotlib (eval.plots): ~1.2 s import (measured), paid only when figures are drawn
    from kdscale.eval.plots import attention_overlays

    size = loader_cfg.image_size
    kind = info["model_config"].kind
    methods = ["cls_last", "rollout"] if kind == "vit" else ["grad_cam"]
    maps = {m: [] for m in methods}
    masks, shown, shown_boxes, dropped, used_masks, greys = [], [], [], 0, 0, []
    region_masks = read_region_masks(loader)
    for batch in loader:
        sel = [i for i, (v, rec) in enumerate(zip(batch["valid"].tolist(), batch["meta"]))
               if v and rec.get("boxes") and batch["present"]["image"][i]]
        if not sel:
            continue
        images = batch["image"][sel]
        for method in methods:
            if method == "grad_cam":
                backbone = model.model.encoder.backbone
                target = getattr(backbone, "layer4", None)
                if target is None:
                    return {"skipped": f"Grad-CAM needs a ResNet-style layer4 in {type(backbone).__name__}"}
                wrapper = _ImageLogits(model)
                maps[method].append(grad_cam(wrapper, target, images))
            else:
                with torch.inference_mode():
                    raw = vit_attention_maps(model.vit, images, method=method)
                maps[method].append(to_image_maps(raw, size))
        for i in sel:
            rec = batch["meta"][i]
            w, h = rec["image_size"]
            boxes = np.array([[b["x"], b["y"], b["w"], b["h"]] for b in rec["boxes"]], dtype=np.float64)
            moved, n_drop = transform_boxes(boxes, (w, h), loader_cfg.resize_size, size, loader_cfg.pad_to_square)
            dropped += n_drop
            region = region_masks.get(rec["key"]) if region_masks is not None else None
            if region is not None and any(b.get("mask") for b in rec["boxes"]):
                masks.append(ground_truth_from_masks(rec, region, loader_cfg.resize_size, size,
                                                     loader_cfg.pad_to_square))
                used_masks += 1
            else:
                masks.append(boxes_to_mask(moved, (size, size)))
            seen_image = _denormalize(batch["image"][i], loader_cfg)
            greys.append(seen_image.mean(axis=2) if seen_image.ndim == 3 else seen_image)
            if len(shown) < max_overlay:
                shown.append(seen_image)
                shown_boxes.append([tuple(map(float, b)) for b in moved])
    if not masks:
        return None
    gt = np.stack(masks)
    result = {"n": int(len(gt)), "boxes_outside_crop": dropped, "threshold": threshold,
              "ground_truth": f"{used_masks} image(s) from region masks, {len(gt) - used_masks} from boxes",
              "methods": {}}
    for method in methods:
        m = np.concatenate(maps[method])
        summary = localization_summary(m, gt, rule="fixed", t=threshold, seed=seed, n_resamples=n_boot)
        result["methods"][method] = {k: v for k, v in summary.items() if k != "per_image"}
    # trivial maps in the same geometry, with the same metrics and bootstrap (docs/eval.md):
    # an attention map is only readable against these
    result.update(localization_references(gt, np.stack(greys), rule="fixed", t=threshold, seed=seed,
                                          n_resamples=n_boot))
    primary = methods[0]
    result.update({k: v for k, v in result["methods"][primary].items() if isinstance(v, dict)})
    result["primary_method"] = primary
    overlay = np.concatenate(maps[primary])[:len(shown)]
    attention_overlays(np.stack(shown), overlay, shown_boxes, [f"#{i + 1}" for i in range(len(shown))], out_png)
    result["overlay_png"] = str(out_png)
    return result


def read_region_masks(loader) -> Optional[dict]:
    """{key: {member name: PNG bytes}} of the region masks stored in the split's shards (e.g.
    covid-cxr-seg's ground-glass / consolidation masks, CBIS-DDSM ROI masks); None when the split
    has none. The loader does not decode these members, so they are read here, once."""
    found: dict = {}
    for shard, _ in loader.shards:
        for name, data in iter_members(shard):
            key, _, member = name.partition(".")
            if member.startswith("mask") and member.endswith(".png"):
                found.setdefault(key, {})[member] = data
    return found or None


def ground_truth_from_masks(rec: dict, region: dict, resize_shorter: int, crop: int,
                            pad_to_square: bool = False) -> np.ndarray:
    """The union of an image's regions as a bool [crop, crop] mask after the loader's
    (letterbox +) resize + centre crop: a box with a stored mask contributes the mask's pixels
    (pasted at the box, the mask being cropped to the box), a box without one its rectangle."""
    w, h = (int(v) for v in rec["image_size"])
    canvas = np.zeros((h, w), dtype=bool)
    for box in rec["boxes"]:
        x0, y0 = int(round(box["x"])), int(round(box["y"]))
        if box.get("mask") and box["mask"] in region:
            with Image.open(io.BytesIO(region[box["mask"]])) as im:
                m = np.asarray(im.convert("L")) > 0
        else:
            m = np.ones((max(1, int(round(box["h"]))), max(1, int(round(box["w"])))), dtype=bool)
        ys, xs = slice(max(0, y0), min(h, y0 + m.shape[0])), slice(max(0, x0), min(w, x0 + m.shape[1]))
        canvas[ys, xs] |= m[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0]
    if pad_to_square:   # the same letterbox as the image (kdscale.data.transforms.PadToSquare)

        side, left, top = letterbox_geometry(w, h)
        square = np.zeros((side, side), dtype=bool)
        square[top: top + h, left: left + w] = canvas
        canvas, w, h = square, side, side
    rw, rh = _resized_size(w, h, resize_shorter)
    resized = np.asarray(Image.fromarray(canvas.astype(np.uint8) * 255).resize((rw, rh), Image.Resampling.NEAREST)) > 0
    out = np.zeros((crop, crop), dtype=bool)
    ox, oy = _crop_offset(rw, crop), _crop_offset(rh, crop)
    src = resized[max(0, oy): max(0, oy) + crop, max(0, ox): max(0, ox) + crop]
    out[max(0, -oy): max(0, -oy) + src.shape[0], max(0, -ox): max(0, -ox) + src.shape[1]] = src
    return out


class _ImageLogits:
    """images -> the image head's logits of a unimodal student, for Grad-CAM."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, images):
        present = {"image": torch.ones(images.shape[0], dtype=torch.bool)}
        return self.model({"image": images, "present": present})["image"]


def _denormalize(image, loader_cfg) -> np.ndarray:
    x = image.float().numpy()
    mean = np.asarray(loader_cfg.mean, np.float32)[:, None, None]
    std = np.asarray(loader_cfg.std, np.float32)[:, None, None]
    x = x * std[: x.shape[0]] + mean[: x.shape[0]]
    return np.clip(x.transpose(1, 2, 0) if x.shape[0] == 3 else x[0], 0, 1)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def evaluate_run(cfg, split: Optional[str] = None, progress: bool = True) -> dict:
    ecfg = cfg.eval
    split = split or ecfg.split
    run_dir = Path(cfg.run.out_dir)
    eval_dir = run_dir / "eval"
    trained = [s for s in cfg.students if (student_dir(cfg, s) / "student.pt").is_file()]
    missing = [s.name for s in cfg.students if s not in trained]
    if not trained:
        raise FileNotFoundError(f"no trained student under {run_dir / 'students'} (run `kdscale train` first); "
                                f"configured: {[s.name for s in cfg.students]}")
    if missing:
        log.warning("students not trained yet, not evaluated: %s", missing)
    base, per_shard = split_samples(shards_out_dir(cfg), split)
    signal = check_signal_labels(ecfg.signal_labels, base.label_names)
    # a bad oracle file stops here, before any model runs
    oracles = oracle_predictions(ecfg.oracle_scores, base) if ecfg.oracle_scores else {}
    full: dict = {}
    warnings: dict = {}
    for student in trained:
        model, info = load_student(student_dir(cfg, student) / "student.pt")
        task = build_task(student, info["ensemble_names"], info["task"], info["label_names"])
        loader_cfg = dataclasses.replace(student_loader_config(cfg, student, training=False), drop_last=False,
                                         num_workers=0)
        loader = build_loader(shards_out_dir(cfg), split, loader_cfg, train=False, rank=0, world_size=1)
        multimodal = not student.image_only and student.model.kind != "unimodal"
        if student.model.kind == "multi":   # drop each of ITS modalities in turn (kdscale/eval/modality_eval.py)
            conditions = ["full"] + removal_conditions(student.model.modalities, ecfg.random_removal)
        else:
            conditions = ["full"] + ([f"drop:{m}" for m in ("image", "ehr")] +
                                     [f"random:{r:g}" for r in ecfg.random_removal] if multimodal else [])
        if progress:
            print(f"eval {student.name}: {loader.plan.num_samples} {split} samples, conditions {conditions}")
        preds = predict_split(model, task, loader, conditions, ecfg.seed, label_task=info["task"])
        out = eval_dir / student.name / split
        out.mkdir(parents=True, exist_ok=True)
        write_predictions(out / "predictions.csv", preds["full"])
        result = evaluate(preds["full"], task.main_head, n_boot=ecfg.bootstrap, seed=ecfg.seed,
                          min_group_size=ecfg.min_group_size, signal_labels=signal or None)
        _say_subgroups(student.name, result["subgroups"], progress)
        if len(conditions) > 1:
            result["robustness"] = robustness(preds, task.main_head, n_boot=ecfg.bootstrap, seed=ecfg.seed)
        if student.model.kind == "multi":
            result.update(_multi_sections(preds["full"], student, model, ecfg))
        if ecfg.localization and student.image_only:
            loc = localization(model, info, loader, loader_cfg, out / "attention.png",
                               ecfg.localization_threshold, ecfg.bootstrap, ecfg.seed)
            if loc is not None:
                if loc.get("overlay_png"):
                    loc["overlay_png"] = str(Path(loc["overlay_png"]).relative_to(eval_dir))
                result["localization"] = loc
        student_info = json.loads((student_dir(cfg, student) / "student.json").read_text())
        result["info"] = {"role": "student", "student": student.name, "method": student.method,
                          "kind": student.model.kind,
                          "parameters": student_info.get("parameters"), "seed": cfg.run.seed,
                          "checkpoint": student_info.get("checkpoint"), "split": split,
                          "val_auroc_macro": student_info.get("val_auroc_macro")}
        result["bootstrap_warnings"] = warnings[student.name] = bootstrap_warnings(result)
        write_json_atomic(out / "evaluation.json", to_jsonable(result))
        full[student.name] = (preds["full"], task.main_head)
    references = evaluate_references(cfg, split, base, per_shard, signal, warnings, progress, oracles)
    comparisons = _comparisons(cfg, full, ecfg)
    write_json_atomic(eval_dir / "comparisons.json", to_jsonable(comparisons))
    write_json_atomic(eval_dir / "leakage.json", teacher_leakage(cfg))
    _print_bootstrap_warnings(warnings)
    return {"eval_dir": str(eval_dir), "students": list(full), "comparisons": len(comparisons), "split": split,
            "references": references["rows"], "references_skipped": references["skipped"]}


def reference_dir_name(row: str) -> str:
    """``teacher:cxr`` -> ``teacher-cxr``: the folder of a reference row under ``eval/``."""
    return row.replace(":", "-", 1)


def evaluate_references(cfg, split: str, base, per_shard: dict, signal: list, warnings: dict,
                        progress: bool = True, oracles: Optional[dict] = None) -> dict:
    """Teachers, ensembles (eval.teachers) and oracle ceilings (eval.oracle_scores) on the split,
    each written like a student: ``eval/<teacher-NAME|ensemble-NAME|oracle-VIEW>/<split>/``
    (evaluation.json + predictions.csv). A source that is not there is a counted skip with its
    reason (``eval/references.json``), never a silent gap."""
    ecfg = cfg.eval
    eval_dir = Path(cfg.run.out_dir) / "eval"
    rows: dict = {}
    skipped: list = []
    evaluated: list = []
    if ecfg.teachers:
        if cfg.teachers.task != "multilabel":
            skipped.append(f"teachers: evaluation of {cfg.teachers.task} teachers is not implemented")
        elif not (softlabels_dir(cfg) / "index.json").is_file():
            skipped.append(f"teachers: no soft labels at {softlabels_dir(cfg)} (run `kdscale softlabels`)")
        else:
            try:
                rows.update(teacher_predictions(softlabels_dir(cfg), split, base, per_shard))
            except DataError as exc:
                skipped.append(f"teachers: {exc}")
    if oracles is None and ecfg.oracle_scores:
        oracles = oracle_predictions(ecfg.oracle_scores, base)      # bad file: an error, not a skip
    rows.update(oracles or {})
    for name, (preds, info) in rows.items():
        if progress:
            print(f"eval {name}: {int(preds.head('score')[1].sum())} {split} samples (reference row)")
        out = eval_dir / reference_dir_name(name) / split
        out.mkdir(parents=True, exist_ok=True)
        write_predictions(out / "predictions.csv", preds)
        try:
            result = reference_evaluation(preds, {**info, "row": name, "split": split}, ecfg.bootstrap,
                                          ecfg.seed, signal or None)
        except ValueError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        result["bootstrap_warnings"] = warnings[name] = bootstrap_warnings(result)
        write_json_atomic(out / "evaluation.json", to_jsonable(result))
        evaluated.append(name)
    for reason in skipped:
        log.warning("reference rows skipped: %s", reason)
    summary = {"split": split, "rows": evaluated, "skipped": skipped, "signal_labels": signal}
    write_json_atomic(eval_dir / "references.json", summary)
    return summary


def _print_bootstrap_warnings(warnings: dict, shown: int = 3) -> None:
    for name, lines in warnings.items():
        if lines:
            print(f"WARNING {name}: {len(lines)} bootstrap interval(s) unreliable, e.g. "
                  + "; ".join(lines[:shown]) + " (all in evaluation.json 'bootstrap_warnings')")


def teacher_leakage(cfg) -> list:
    """The label-leakage warnings of the run's trained teachers (their teacher.json, written by
    kdscale.distill.teachers), for the report: [{"teacher", "warning"}]. Each is repeated on the
    console, as the students distilled from those teachers are being evaluated."""
    out = []
    for teacher in cfg.teachers.members:
        path = teachers_dir(cfg) / teacher.name / "teacher.json"
        if not path.is_file():
            continue
        for warning in (json.loads(path.read_text()).get("leakage") or {}).get("warnings", []):
            log.warning("teacher %s: possible label leakage: %s", teacher.name, warning)
            out.append({"teacher": teacher.name, "warning": warning})
    return out


def _say_subgroups(name: str, section: dict, progress: bool) -> None:
    """Per attribute, how many samples had it; every subgroup warning (empty analysis, an
    attribute unknown for all) on the console, never only in evaluation.json."""
    if progress:
        print(f"eval {name}: {subgroup_counts_line(section)}")
    for warning in section.get("warnings", []):
        log.warning("eval %s: %s", name, warning)


def _comparisons(cfg, full: dict, ecfg) -> list:
    if len(full) < 2:
        return []
    reference = ecfg.compare_to or next(iter(full))
    if reference not in full:
        raise ValueError(f"eval.compare_to {reference!r} is not an evaluated student: {list(full)}")
    ref_preds, ref_head = full[reference]
    out = []
    for name, (preds, head) in full.items():
        if name == reference:
            continue
        # every label, then (eval.signal_labels) only the labels with designed signal
        for labels in [None] + ([list(ecfg.signal_labels)] if ecfg.signal_labels else []):
            for cohort in ("all", "paired"):
                try:
                    out.append(compare(ref_preds, preds, ref_head, head, n_boot=ecfg.bootstrap, seed=ecfg.seed,
                                       cohort=None if cohort == "all" else cohort, name_a=reference, name_b=name,
                                       labels=labels))
                except ValueError as exc:   # e.g. a data set without EHR has no paired cohort
                    log.info("comparison %s vs %s (%s) not possible: %s", reference, name, cohort, exc)
            # a unimodal student is also compared with the reference's own head for that modality
            # (MIND's image head vs an image student of the same size without teachers)
            if head != ref_head and head in ref_preds.heads:
                try:
                    out.append(compare(ref_preds, preds, head, head, n_boot=ecfg.bootstrap, seed=ecfg.seed,
                                       name_a=f"{reference}/{head}", name_b=name, labels=labels))
                except ValueError as exc:   # e.g. the two heads cover no common sample
                    log.info("comparison %s/%s vs %s not possible: %s", reference, head, name, exc)
    return out
