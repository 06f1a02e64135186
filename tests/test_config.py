"""Config loading: defaults inheritance, overrides, validation errors that name key and file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from kdscale import config
from kdscale.config import ConfigError, path_field
from kdscale.schema import Config, load_config


@dataclass
class Inner:
    depth: int = 2
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    maybe: Optional[Inner] = None
    weights: dict[str, float] = field(default_factory=dict)
    data_dir: str = path_field("")
    flag: bool = False


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_chain_then_file_then_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"name": "base", "inner": {"depth": 3, "rate": 0.5}})
    write(tmp_path / "mid.yaml", {"defaults": ["base.yaml"], "inner": {"depth": 4}})
    child = write(tmp_path / "child.yaml", {"defaults": ["mid.yaml"], "inner": {"kind": "b"}})
    cfg = config.load(Outer, child, ["inner.rate=0.25", "weights.image=2", "inner.tags=[x, y]"])
    assert cfg.name == "base"
    assert cfg.inner == Inner(depth=4, rate=0.25, kind="b", tags=["x", "y"])
    assert cfg.weights == {"image": 2.0}


def test_unknown_key_names_closest_key_and_file(tmp_path):
    path = write(tmp_path / "c.yaml", {"name": "x", "inner": {"depht": 3}})
    with pytest.raises(ConfigError) as err:
        config.load(Outer, path)
    msg = str(err.value)
    assert "'inner.depht'" in msg and "did you mean 'inner.depth'" in msg and str(path) in msg


def test_wrong_type_names_key_type_and_origin(tmp_path):
    path = write(tmp_path / "c.yaml", {"name": "x"})
    with pytest.raises(ConfigError, match=r"'inner.depth' \(from <command line>\): expected an integer"):
        config.load(Outer, path, ["inner.depth=many"])
    with pytest.raises(ConfigError, match="expected true/false"):
        config.load(Outer, path, ["flag=1"])
    with pytest.raises(ConfigError, match=r"must be one of 'a' \| 'b', got 'c'"):
        config.load(Outer, path, ["inner.kind=c"])
    with pytest.raises(ConfigError, match=r"'maybe.rate'.*expected a number"):
        config.load(Outer, path, ["maybe.rate=fast"])


def test_missing_required_key_names_key(tmp_path):
    path = write(tmp_path / "c.yaml", {"inner": {"depth": 1}})
    with pytest.raises(ConfigError, match=r"required config key 'name' is missing.*c\.yaml"):
        config.load(Outer, path)


def test_missing_path_is_an_error_naming_key_and_file(tmp_path):
    path = write(tmp_path / "c.yaml", {"name": "x", "data_dir": "does/not/exist"})
    with pytest.raises(ConfigError, match=r"'data_dir' \(from .*c\.yaml\): path does not exist"):
        config.load(Outer, path, base_dir=tmp_path)
    (tmp_path / "does/not/exist").mkdir(parents=True)
    cfg = config.load(Outer, path, base_dir=tmp_path)
    assert cfg.data_dir == str(tmp_path / "does/not/exist")


def test_cycles_and_bad_yaml_are_clear(tmp_path):
    write(tmp_path / "a.yaml", {"defaults": ["b.yaml"], "name": "a"})
    write(tmp_path / "b.yaml", {"defaults": ["a.yaml"]})
    with pytest.raises(ConfigError, match="circular"):
        config.load(Outer, tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        config.load(Outer, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        config.load(Outer, tmp_path / "list.yaml")


def test_safe_load_only(tmp_path):
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        config.load(Outer, tmp_path / "evil.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        config.parse_override("noequals")
    with pytest.raises(ConfigError, match="bad key"):
        config.parse_override("a..b=1")
    assert config.parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_override_into_a_value_is_an_error(tmp_path):
    path = write(tmp_path / "c.yaml", {"name": "x"})
    with pytest.raises(ConfigError, match="is a value, not a section"):
        config.load(Outer, path, ["name.sub=1"])


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["data.demo.n=50", f"run.out_dir={tmp_path}/run"])
    config.dump(cfg, tmp_path / "resolved.yaml")
    again = config.load(Config, tmp_path / "resolved.yaml")
    assert again == cfg
    assert config.config_hash(again) == config.config_hash(cfg)


def test_every_shipped_config_loads(repo_root, monkeypatch):
    """Each configs/**/*.yaml that needs no user data validates (user-path configs are checked
    to fail with a path error naming their key, not an obscure one)."""
    monkeypatch.chdir(repo_root)
    for path in sorted((repo_root / "configs").rglob("*.yaml")):
        if path.parent.name == "ehr":
            continue  # discretizer definitions, not kdscale configs (tested in test_ehr.py)
        if path.parent.name == "experiments":
            continue  # experiment configs, not pipeline configs (tested in test_experiment.py)
        try:
            load_config(path)
        except ConfigError as exc:
            assert "path does not exist" in str(exc) or "is missing" in str(exc), (path, exc)


def test_source_section_required(tmp_path):
    with pytest.raises(ConfigError, match="data.source is 'cbis' but the section 'data.cbis' is missing"):
        load_config(None, ["data.source=cbis"])
    with pytest.raises(ConfigError, match="data.demo.corrupt_fraction must be in"):
        load_config(None, ["data.demo.corrupt_fraction=1.5"])



@dataclass
class _Checked:
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("size must be >= 1")


@dataclass
class _WithList:
    items: list[Inner] = field(default_factory=list)
    checked: _Checked = field(default_factory=_Checked)


def test_command_line_override_is_named_as_such_in_lists_and_section_checks(tmp_path):
    """Issue 16 finding 12: a list-item override was reported as '(from <defaults>)'."""
    path = write(tmp_path / "c.yaml", {"items": [{"depth": 1}], "checked": {"size": 2}})
    with pytest.raises(ConfigError, match=r"'items\[0\]\.kind' \(from <command line>\): must be one of"):
        config.load(_WithList, path, ["items.0.kind=zzz"])
    # the same key set in the file still names the file
    bad = write(tmp_path / "bad.yaml", {"items": [{"kind": "zzz"}]})
    with pytest.raises(ConfigError, match=r"'items\[0\]\.kind' \(from .*bad\.yaml\)"):
        config.load(_WithList, bad)
    # a section's own check names the file of the section and the overridden key within it
    with pytest.raises(ConfigError, match=r"'checked' \(from .*c\.yaml; checked\.size from <command line>\)"):
        config.load(_WithList, path, ["checked.size=0"])
    assert "<defaults>" not in str(pytest.raises(ConfigError, config.load, _WithList, path,
                                                 ["items.0.depth=x"]).value)


def test_override_of_one_student_leaves_an_anchored_twin_unchanged(tmp_path):
    # configs/demo.yaml shares one train: block between students through a YAML anchor; an
    # override of students.0 must not reach students.1 (issue 12)
    (tmp_path / "c.yaml").write_text(
        "a:\n  - train: &shared {epochs: 1, lr: 0.1}\n  - train: *shared\n")
    tree = config._unshared(config.load_tree(tmp_path / "c.yaml", {}))
    config.apply_overrides(tree, ["a.0.train.epochs=3"], {})
    assert tree["a"][0]["train"]["epochs"] == 3
    assert tree["a"][1]["train"] == {"epochs": 1, "lr": 0.1}


def test_demo_config_students_do_not_share_their_train_block():
    from kdscale.config import CONFIGS_ROOT

    base = load_config(CONFIGS_ROOT / "demo.yaml")
    cfg = load_config(CONFIGS_ROOT / "demo.yaml", ["students.0.train.epochs=97"])
    assert cfg.students[0].train.epochs == 97
    assert [s.train.epochs for s in cfg.students[1:]] == [s.train.epochs for s in base.students[1:]]


def test_an_inherited_compare_to_must_name_one_of_the_configs_students():
    from kdscale.config import CONFIGS_ROOT, ConfigError

    # demo.yaml compares from mind_val_labels; a config with other students that forgets to say
    # which one is the reference fails at load, naming the key, not at the end of evaluation
    students = ('students=[{name: a, method: joint, model: {kind: joint}}, '
                '{name: b, method: joint, model: {kind: joint}}]')
    with pytest.raises(ConfigError, match=r"eval.compare_to 'mind_val_labels' is not one of the students \['a', 'b'\]"):
        load_config(CONFIGS_ROOT / "demo.yaml", [students])
    assert load_config(CONFIGS_ROOT / "demo.yaml", [students, "eval.compare_to=b"]).eval.compare_to == "b"
    one = load_config(CONFIGS_ROOT / "demo.yaml", ["students=[{name: a, method: joint, model: {kind: joint}}]"])
    assert [s.name for s in one.students] == ["a"]   # one student: nothing is compared, nothing to check


# Modules that config loading must never import: torch and what sits on it, and the stage modules
# whose config dataclasses live in torch-free *_config.py modules beside them.
_RUNTIME_MODULES = ("torch", "torchvision", "timm", "accelerate", "transformers", "deepspeed",
                    "kdscale.data.loader", "kdscale.data.transforms", "kdscale.models.students",
                    "kdscale.distill.student_training", "kdscale.distill.teachers", "kdscale.distill.teacher_pass",
                    "kdscale.engine.trainer")


@pytest.mark.parametrize("cfg", ["configs/demo.yaml", "configs/mind.yaml"])
def test_config_loading_imports_no_runtime_module(cfg):
    """``kdscale config`` and every stage's config validation stay torch-free: the schema imports
    only the *_config.py modules. Both the library call and the CLI command are checked."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    check = (f"loaded = sorted(m for m in {_RUNTIME_MODULES!r} if m in sys.modules); "
             "assert not loaded, f'config loading imported {loaded}'")
    library = f"import sys; from kdscale.schema import load_config; c = load_config({cfg!r}); {check}"
    cli = "\n".join(["import contextlib, io, sys", "from kdscale.cli import main", "out = io.StringIO()",
                     "with contextlib.redirect_stdout(out):", f"    rc = main(['config', '--cfg', {cfg!r}])",
                     "assert rc == 0 and 'students:' in out.getvalue(), rc", check])
    for code in (library, cli):
        subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


def test_experiment_config_loads_without_runtime_modules():
    """An experiment config validates through its own torch-free module, like the pipeline's."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from kdscale import config; from kdscale.experiments.runner_config import ExperimentConfig; "
            "exp = config.load(ExperimentConfig, 'configs/experiments/mind.yaml'); assert exp.arms; "
            f"loaded = sorted(m for m in {_RUNTIME_MODULES + ('kdscale.experiments.runner', 'kdscale.eval.analysis')!r} "
            "if m in sys.modules); assert not loaded, f'experiment config loading imported {loaded}'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
