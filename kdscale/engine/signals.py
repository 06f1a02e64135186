"""What a save-request signal turns into (torch-free, so the CLI can catch it cheaply)."""
from __future__ import annotations

# The process exit status of a command stopped by a save request: the checkpoint is written and
# the job should be requeued and resumed (EX_TEMPFAIL of sysexits.h: "try again later").
EXIT_PREEMPTED = 75


class Preempted(RuntimeError):
    """A save was requested by a signal (SLURM preemption / time limit); the state is saved."""
