"""An experiment config (``configs/experiments/*.yaml``): :class:`ExperimentConfig` with its arms and
sweep, validated at load without importing torch or the evaluation code. Running it is
``kdscale.experiments.runner``."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from kdscale.config import path_field


@dataclass
class ArmConfig:
    name: str                                   # also the student's name
    student: dict[str, Any] = field(default_factory=dict)  # one entry of the pipeline's students: list
    from_base: str = ""                         # start from this student of the base config, then
                                                # merge ``student`` into it (so base changes carry over)
    overrides: list[str] = field(default_factory=list)   # extra key=value (students/eval only)
    label: str = ""                             # shown in the report (default: the name)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"arm name {self.name!r} must be non-empty letters, digits, '_' or '-'")
        if self.student.get("name", self.name) != self.name:
            raise ValueError(f"arm {self.name!r}: student.name {self.student['name']!r} differs from the arm name "
                             f"(leave it out: the arm name is used)")


@dataclass
class SweepConfig:
    """Arms generated from one arm by setting ``key`` (a dotted key inside its student) to each
    of ``values``; named ``<name>-<i>``."""
    from_arm: str
    key: str
    values: list[Any]
    name: str = "sweep"

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("sweep.values is empty")
        if not self.key or any(not p for p in self.key.split(".")):
            raise ValueError(f"sweep.key {self.key!r} must be a dotted key inside the student, e.g. mind.omega")


@dataclass
class ExperimentConfig:
    name: str
    base: str = path_field()                    # the pipeline config every run extends
    out_dir: str = path_field("runs/experiment", must_exist=False)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)   # applied to every run (e.g. smaller data)
    arms: list[ArmConfig] = field(default_factory=list)
    sweep: Optional[SweepConfig] = None
    reference: str = ""                         # arm every other arm is compared with (default: first)
    bootstrap: int = 1000                       # resamples of the pooled paired bootstrap
    shortcut: bool = False                      # image students: attention share on the shortcut marker
    description: str = ""

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        if self.bootstrap < 1:
            raise ValueError("bootstrap must be >= 1")
        if self.sweep is not None:
            self.arms = self.arms + sweep_arms(self.arms, self.sweep)
        names = [a.name for a in self.arms]
        if not names:
            raise ValueError("arms is empty: an experiment needs at least one arm")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arms: duplicate names {dupes}")
        if self.reference and self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not an arm: {names}")
        if not self.reference:
            self.reference = names[0]

    def arm(self, name: str) -> ArmConfig:
        return next(a for a in self.arms if a.name == name)

    @property
    def sweep_arm_names(self) -> list[str]:
        if self.sweep is None:
            return []
        return [self.sweep.from_arm] + [a.name for a in self.arms if a.name.startswith(f"{self.sweep.name}-")]


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"sweep.key {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = copy.deepcopy(value)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def sweep_arms(arms: list[ArmConfig], sweep: SweepConfig) -> list[ArmConfig]:
    source = next((a for a in arms if a.name == sweep.from_arm), None)
    if source is None:
        raise ValueError(f"sweep.from_arm {sweep.from_arm!r} is not an arm: {[a.name for a in arms]}")
    out = []
    for i, value in enumerate(sweep.values):
        student = copy.deepcopy(source.student)
        _set_dotted(student, sweep.key, value)
        name = f"{sweep.name}-{i}"
        student.pop("name", None)
        out.append(ArmConfig(name=name, student=student, from_base=source.from_base, overrides=list(source.overrides),
                             label=f"{source.label or source.name}: {sweep.key.split('.')[-1]} {_describe(value)}"))
    return out
