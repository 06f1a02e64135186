"""One rule for progress bars, everywhere: a bar is drawn only when it was asked for, by the
process that reports (rank 0), and only when stderr is a terminal.

In SLURM and CI logs every redraw of a bar is one more line of noise (the teacher pass used to
write them there); the per-epoch, per-shard and per-run log lines carry the same figures. Every
bar in kdscale comes from here (tests/test_progress.py checks that nothing else imports tqdm).
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO

from tqdm import tqdm


def show_progress(requested: bool = True, *, main: bool = True, stream: Optional[TextIO] = None) -> bool:
    """Whether to draw a bar: asked for (``requested``, e.g. not ``--no-progress``), on the
    reporting process (``main``) and with ``stream`` (default stderr) a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(requested and main and isatty is not None and isatty())


def progress_bar(desc: str, *, unit: str, total: Optional[int] = None, requested: bool = True,
                 main: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr that draws only under :func:`show_progress`; otherwise a disabled bar
    with the same methods (update, set_postfix_str, close, ``with``), so callers need no branch."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not show_progress(requested, main=main),
                dynamic_ncols=True, **kwargs)
