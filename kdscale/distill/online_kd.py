"""Online KD, a measurement mode: the teacher ensembles forward the SAME augmented batch the student
sees, instead of the stored soft labels (which describe the unaugmented image).

``students[i].online_kd: true`` trains that student this way. It exists to measure what offline
soft labels cost under augmentation (issue 12, item 8; docs/evidence-experiments.md): the stored
soft labels are the teachers' view of the centre-cropped film, while the student is trained on
flipped / rotated / shifted / scaled views of it. The teachers are loaded from the run's
teachers folder (the same checkpoints and ensemble weights the teacher pass used) and run in eval
mode, so the only difference to offline KD is the view the teachers see. It is slower: every
batch pays the teachers' forward passes.
"""
from __future__ import annotations

import dataclasses

import torch

from kdscale.distill.teacher_pass import combine_ensembles, load_teachers, run_teachers


def load_online_teachers(cfg, ensemble_names: list[str]):
    """The teachers of the named ensembles (others, e.g. a report teacher the student's loader
    does not read, are left out) as a LoadedTeachers."""
    teachers = load_teachers(cfg)
    ensembles = [e for e in teachers.ensembles if e["name"] in ensemble_names]
    missing = sorted(set(ensemble_names) - {e["name"] for e in ensembles})
    if missing:
        raise ValueError(f"online KD: teacher ensemble(s) {missing} are not configured (teachers.ensembles)")
    members = {m for e in ensembles for m in e["members"]}
    keep = [i for i, info in enumerate(teachers.infos) if info["name"] in members]
    return dataclasses.replace(teachers, models=[teachers.models[i] for i in keep],
                               infos=[teachers.infos[i] for i in keep], ensembles=ensembles)


class OnlineSoftLabels:
    """Wraps a train loader: every batch gets ``soft`` = the teachers' ensemble logits on that
    batch (same layout as the stored soft labels: ``ensemble`` [B, G, C], ``ensemble_seen`` [B, G])."""

    def __init__(self, loader, teachers, task: str = "multilabel"):
        self.loader, self.teachers, self.task = loader, teachers, task
        for model in teachers.models:
            model.eval()

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            logits, seen = run_teachers(self.teachers, batch, torch.device("cpu"))
            ensemble, has = combine_ensembles(self.teachers, logits, seen, task=self.task)
            yield {**batch, "soft": {"ensemble": ensemble.clone(), "ensemble_seen": has.clone()}}
