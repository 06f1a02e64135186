"""One progress-bar rule (kdscale/progress.py): a bar only when asked for, on the reporting
process, on a terminal; and every bar in kdscale goes through it."""
from __future__ import annotations

import ast
import io
from pathlib import Path

from kdscale.progress import progress_bar, show_progress

KDSCALE = Path(__file__).resolve().parents[1] / "kdscale"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_only_when_asked_on_the_main_process_on_a_terminal():
    assert show_progress(True, main=True, stream=_Terminal())
    assert not show_progress(False, main=True, stream=_Terminal())
    assert not show_progress(True, main=False, stream=_Terminal())
    assert not show_progress(True, main=True, stream=io.StringIO())      # a SLURM / CI log file
    assert not show_progress(True, main=True, stream=object())           # no isatty at all


def test_no_redraws_reach_a_log_that_is_not_a_terminal(capsys):
    # pytest's captured stderr is not a terminal: the bar must stay silent, as in a SLURM log
    with progress_bar("teacher pass", unit="sample", total=1000) as bar:
        for _ in range(1000):
            bar.update(1)
        bar.set_postfix_str("x")
    assert capsys.readouterr().err == ""


def test_every_bar_goes_through_kdscale_progress():
    users = []
    for path in sorted(KDSCALE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "tqdm" or n.startswith("tqdm.") for n in names):
                users.append(f"{path.relative_to(KDSCALE.parent)}:{node.lineno}")
    assert users == ["kdscale/progress.py:13"]
