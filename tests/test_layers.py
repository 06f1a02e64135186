"""The import-layer checker (kdscale/devtools/check_layers.py): the real tree passes, and planted
upward imports, cycles and unplaced modules in a small fake kdscale tree fail with file:line."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from kdscale.devtools import check_layers

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path, files: dict[str, str]) -> Path:
    """A fake kdscale package under ``root``: the layer packages the tests need, plus ``files``."""
    base = {"kdscale/__init__.py": "", "kdscale/config.py": "", "kdscale/data/__init__.py": "",
            "kdscale/data/record.py": "", "kdscale/eval/__init__.py": "",
            "kdscale/eval/metrics.py": "import numpy\nfrom kdscale.data import record\n"}
    for name, text in {**base, **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_real_tree_passes():
    """The layering of docs/design.md holds for the repository's kdscale/ (CI runs this test)."""
    assert check_layers.check(REPO) == []


def test_command_line_on_real_tree():
    done = subprocess.run([sys.executable, "-m", "kdscale.devtools.check_layers"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no cycles" in done.stdout


def test_clean_fake_tree_passes(tmp_path):
    assert check_layers.check(_tree(tmp_path, {})) == []


def test_function_local_upward_import_fails_with_file_and_line(tmp_path):
    root = _tree(tmp_path, {"kdscale/data/loader.py": """\
        import json


        def scores(x):
            from kdscale.eval.metrics import auroc
            return auroc(x)
        """})
    problems = check_layers.check(root)
    assert problems == ["kdscale/data/loader.py:5: upward import: kdscale.data.loader (layer data) "
                        "imports kdscale.eval.metrics (layer eval)"]
    done = subprocess.run([sys.executable, "-m", "kdscale.devtools.check_layers", "--root", str(root)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert "kdscale/data/loader.py:5: upward import" in done.stdout


def test_relative_and_package_imports_resolve_to_the_module(tmp_path):
    # ``from ..eval import metrics`` depends on the eval.metrics module, not on eval/__init__
    root = _tree(tmp_path, {"kdscale/data/loader.py": "from ..eval import metrics\n",
                            "kdscale/data/shards.py": "import kdscale.eval.metrics.auroc\n"})
    problems = check_layers.check(root)
    assert [p.split(": ")[0] for p in problems] == ["kdscale/data/loader.py:1", "kdscale/data/shards.py:1"]
    assert all("imports kdscale.eval.metrics (layer eval)" in p for p in problems)


def test_cycle_inside_a_layer_fails_naming_every_edge(tmp_path):
    root = _tree(tmp_path, {"kdscale/data/shards.py": "from kdscale.data import record\n\n"
                                                      "def index():\n    from kdscale.data import shard_index\n",
                            "kdscale/data/shard_index.py": "from kdscale.data.shards import index\n"})
    problems = check_layers.check(root)
    assert len(problems) == 1
    assert "import cycle between kdscale.data.shard_index, kdscale.data.shards" in problems[0]
    assert "kdscale/data/shard_index.py:1 kdscale.data.shard_index -> kdscale.data.shards" in problems[0]
    assert "kdscale/data/shards.py:4 kdscale.data.shards -> kdscale.data.shard_index" in problems[0]


def test_module_in_no_layer_fails(tmp_path):
    problems = check_layers.check(_tree(tmp_path, {"kdscale/newpkg/__init__.py": ""}))
    assert problems == ["kdscale/newpkg/__init__.py:1: module kdscale.newpkg is in no layer "
                        "(add it to LAYERS in kdscale/devtools/check_layers.py)"]


def test_layer_of_uses_the_nearest_named_parent():
    assert check_layers.LAYERS[check_layers.layer_of("kdscale.data.sources.mimic")][0] == "data"
    assert check_layers.LAYERS[check_layers.layer_of("kdscale.config")][0] == "base"
    assert check_layers.layer_of("kdscalex.data") is None
