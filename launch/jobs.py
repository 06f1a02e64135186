"""What runs inside a launcher job: one task of a ``launch.plan.JobSpec``, on every rank.

``StageJob`` is the submitit callable. On each rank it

1. checks that the allocation SLURM granted is the layout the launcher asked for
   (``SLURM_JOB_NUM_NODES``, ``SLURM_NTASKS``, ``SLURM_TASKS_PER_NODE``, visible GPUs);
2. under ``--cluster local``, exports the torchrun variables for the local ranks
   (``kdscale.engine.distributed.export_env``; under SLURM kdscale derives them itself from the
   SLURM variables, MASTER_ADDR = first node, MASTER_PORT from the job id);
3. runs the task's ``kdscale`` commands in-process (``kdscale.cli.main``);
4. handles preemption (below) and records start / requeue / failure events in
   ``RUN/slurm/<job>/events.jsonl``.

Preemption and time limits
--------------------------
SLURM sends the job's steps SIGUSR2 ``signal_delay_s`` before the time limit (and on preemption
when the site sends a user signal); ``scancel --signal=USR1`` does the same by hand. The
engine's own handler (installed by ``Trainer.fit``) only requests a save: the loop saves at
the next step boundary and the command exits with status 75 (``Preempted``). Then rank 0 runs
``scontrol requeue <job>``: the job keeps its id (dependent jobs keep waiting on it), goes back
to the queue, and its next start resumes from the latest checkpoint (``train --resume auto``,
``teachers --resume latest``).

A ``PreemptionWatch`` sees every signal through ``signal.set_wakeup_fd``, whichever Python
handler is installed, on a thread that keeps running while the main thread is blocked in C
(a collective, a data read). Outside a training loop (shards, soft labels, eval, model set-up)
no loop would honour the request, so it requeues at once; these stages are idempotent and
restartable. While a loop's handler is installed it gives the loop ``save_grace_s`` to save and
exit, then requeues anyway (the loop had already finished, or a step is slower than the grace).
SIGTERM (scancel, the kill at the time limit, a requeue by SLURM or an admin) lets the engine
save but never makes the job requeue itself.

Requeues are bounded: a job that was already requeued ``max_requeues`` times
(``SLURM_RESTART_COUNT``; local: the count of earlier starts) fails with a clear message instead.
"""
from __future__ import annotations

import _thread
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import submitit

from launch.plan import EXIT_PREEMPTED, JobSpec, Layout, Step, Task

LOCAL_REQUEUE_EXIT = 144          # submitit's LocalExecutor restarts a job whose task exits with this
NOTICE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
PREFIX = "[kdscale-launch]"


class StageFailed(RuntimeError):
    """A stage's command failed, or the job cannot continue (layout, requeue budget)."""


class LayoutError(StageFailed):
    """SLURM granted another layout than the launcher requested."""


@dataclass
class JobPayload:
    job: JobSpec
    task: Task
    task_index: int               # the array index (0 for a single job)
    cluster: str                  # slurm | local | debug
    folder: str                   # RUN/slurm/<job.name>
    max_requeues: int = 3
    save_grace_s: float = 60.0


def say(message: str) -> None:
    print(f"{PREFIX} {time.strftime('%H:%M:%S')} {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Layout check
# ---------------------------------------------------------------------------------------------

def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ('2(x3),1') -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in filter(None, text.split(",")):
        if "(x" in part:
            value, times = part.rstrip(")").split("(x")
            counts += [int(value)] * int(times)
        else:
            counts.append(int(part))
    return counts


def check_layout(layout: Layout, env=None) -> None:
    """Fail with a clear error when the allocation is not the requested layout (SLURM only)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return
    if "SLURM_PROCID" not in env:
        raise LayoutError("kdscale runs one process per task: the job's command must be started with srun "
                          "(SLURM_PROCID is not set)")
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 0)
    ntasks = int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or 0)
    per_node = expand_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", ""))
    wanted = f"{layout.describe()} = {layout.ntasks} rank(s)"
    if nodes != layout.nodes or ntasks != layout.ntasks or (per_node and set(per_node) != {layout.tasks_per_node}):
        raise LayoutError(f"SLURM granted {nodes} node(s), {ntasks} task(s) (tasks per node "
                          f"{env.get('SLURM_TASKS_PER_NODE', '?')}) but the launcher requested {wanted}: check "
                          f"--sbatch overrides of nodes/ntasks and the partition's limits")
    if layout.gpus_per_node:
        import torch

        visible = torch.cuda.device_count()
        if visible < layout.tasks_per_node:
            raise LayoutError(f"{layout.tasks_per_node} task(s) per node need one GPU each, this node shows "
                              f"{visible} (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r})")


# ---------------------------------------------------------------------------------------------
# Job identity, events and the requeue decision
# ---------------------------------------------------------------------------------------------

class JobContext:
    def __init__(self, payload: JobPayload):
        self.payload = payload
        self.env = submitit.JobEnvironment()
        self.rank = self.env.global_rank
        self.job_id = self.env.job_id               # "123" or "123_4" for an array task
        self.events = Path(payload.folder) / "events.jsonl"
        self.requeue_lock = threading.Lock()
        self.requeue_outcome: Optional[str] = None  # requeued | refused | ending
        self.notices: list[int] = []                # USR1/USR2 received by this process

    @property
    def cluster(self) -> str:
        return self.payload.cluster

    def event(self, kind: str, **fields) -> None:
        record = {"time": round(time.time(), 3), "event": kind, "job": self.job_id, "rank": self.rank,
                  "stage": self.payload.job.stage, "task": self.payload.task.label, **fields}
        try:
            with open(self.events, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # never let bookkeeping kill a job
            say(f"cannot write {self.events}: {exc}")

    def restarts(self) -> int:
        if self.cluster == "slurm":
            return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if not self.events.is_file():
            return 0
        starts = 0
        for line in self.events.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            starts += rec.get("event") == "start" and rec.get("job") == self.job_id and rec.get("rank") == self.rank
        return starts

    def requeue(self, reason: str) -> str:
        """Requeue this job once (rank 0 under SLURM, every rank locally). Returns the outcome."""
        with self.requeue_lock:
            if self.requeue_outcome is None:
                self.requeue_outcome = self._requeue(reason)
            return self.requeue_outcome

    def _requeue(self, reason: str) -> str:
        budget = self.payload.max_requeues
        done = self.restarts() - (1 if self.cluster == "local" else 0)
        if done >= budget:
            say(f"NOT requeued ({reason}): already requeued {done} time(s), --max-requeues {budget}")
            self.event("requeue_refused", reason=reason, restarts=done, max_requeues=budget)
            return "refused"
        if self.cluster == "local":
            say(f"requeue {done + 1}/{budget} ({reason}): restarting the local tasks")
            self.event("requeue", reason=reason, restarts=done + 1, max_requeues=budget)
            return "requeued"
        if self.cluster != "slurm":
            return "refused"
        if self.rank != 0:
            return "deferred"  # rank 0 requeues; SLURM then stops every task
        state = _squeue_state(self.job_id)
        if state not in ("RUNNING", None):
            say(f"not requeued ({reason}): the job is {state}, SLURM is ending it")
            return "ending"
        proc = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            say(f"scontrol requeue {self.job_id} failed: {proc.stderr.strip()}")
            self.event("requeue_failed", reason=reason, error=proc.stderr.strip()[-300:])
            return "refused"
        say(f"requeued job {self.job_id} ({reason}): requeue {done + 1}/{budget}; when it starts again, training "
            f"resumes from its latest checkpoint and the other stages skip the work already done")
        self.event("requeue", reason=reason, restarts=done + 1, max_requeues=budget)
        return "requeued"


def _squeue_state(job_id: str) -> Optional[str]:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------

class PreemptionWatch:
    """Sees USR1/USR2 on a thread, whatever the main thread is doing (see the module doc)."""

    def __init__(self, ctx: JobContext, on_exit):
        self.ctx, self.on_exit = ctx, on_exit
        self._old_handlers: dict = {}
        self._old_fd = -1
        self._stop = threading.Event()

    def _handler(self, signum, frame) -> None:  # main thread: the watch thread does the work
        pass

    def start(self) -> "PreemptionWatch":
        self._r, self._w = socket.socketpair()
        self._w.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in NOTICE_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._handler)
        self._thread = threading.Thread(target=self._loop, name="kdscale-preemption-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        signal.set_wakeup_fd(self._old_fd)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        try:  # wake the thread (forked data-loader workers may hold the socket open: no EOF)
            self._w.send(b"\0")
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._w.close()
        self._r.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._r.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                self._seen(signum)

    def _seen(self, signum: int) -> None:
        if self._stop.is_set():
            return
        try:
            name = signal.Signals(signum).name
        except ValueError:
            return
        if signum == signal.SIGTERM:
            say("SIGTERM: the job is being stopped (scancel, time limit or requeue by SLURM)")
            return
        if signum not in NOTICE_SIGNALS:
            return
        self.ctx.notices.append(signum)
        engine_active = signal.getsignal(signum) != self._handler
        if self.ctx.rank == 0:
            say(f"{name}: preemption / time-limit notice" +
                (f"; the training loop saves at its next step boundary (grace {self.ctx.payload.save_grace_s:.0f} s)"
                 if engine_active else "; no training loop is running: requeue now"))
        if engine_active:
            timer = threading.Timer(self.ctx.payload.save_grace_s, self._act, (f"{name}, after the save grace",))
            timer.daemon = True  # never keeps a finished job alive
            timer.start()
        else:
            self._act(name)

    def _act(self, reason: str) -> None:
        if self._stop.is_set() or self.ctx.requeue_outcome is not None:
            return  # the main thread handled it (status 75) or the job is over
        outcome = self.ctx.requeue(reason)
        if outcome == "requeued" and self.ctx.cluster == "local":
            self.on_exit(LOCAL_REQUEUE_EXIT)
        elif outcome == "requeued":  # stop the stage's work now: SLURM stops the job within KillWait anyway
            _thread.interrupt_main()


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def _has_checkpoint(folder: str) -> bool:
    path = Path(folder)
    if not path.is_dir():
        return False
    from kdscale.engine.checkpoint import CheckpointManager

    return CheckpointManager(path).latest() is not None


def run_step(step: Step, rank: int) -> int:
    """Run one kdscale command in this process; its exit status."""
    if step.rank0_only and rank != 0:
        return 0
    argv = list(step.argv)
    if step.resume_dir and not Path(step.done_file).is_file() and _has_checkpoint(step.resume_dir):
        argv += ["--resume", "latest"]
    if rank == 0:
        say(f"run: kdscale {' '.join(argv)}")
    from kdscale.cli import main

    try:
        return int(main(argv) or 0)
    except SystemExit as exc:  # argparse errors
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        if type(exc).__name__ == "Preempted":  # a CLI that lets Preempted escape
            return EXIT_PREEMPTED
        raise


def _demo_data(cfg_path: str, folder: str) -> None:
    """Generate the demo tree once, under a lock in the job folder: the array tasks (and sweep
    points) that share it would race on it."""
    import fcntl

    from kdscale.data.sources import build_source
    from kdscale.schema import load_config

    cfg = load_config(cfg_path)
    with open(Path(folder) / "demo-data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_source(cfg.data)  # the demo source generates its tree on first use


def _export_local_world(ctx: JobContext) -> None:
    """--cluster local: the local ranks get the torchrun variables (SLURM jobs need nothing)."""
    from kdscale.engine.distributed import World, export_env, port_for_job

    n = ctx.env.num_tasks
    if n > 1:
        export_env(World(rank=ctx.rank, world_size=n, local_rank=ctx.env.local_rank, local_world_size=n,
                         master_addr="127.0.0.1", master_port=port_for_job(ctx.job_id), launcher="local"))


class StageJob(submitit.helpers.Checkpointable):
    """The submitit callable. ``checkpoint()`` (submitit's own USR2 path, used only before
    ``__call__`` installs the watch) returns a fresh instance: the work resumes from files."""

    def __init__(self, payload: JobPayload):
        self.payload = payload

    def checkpoint(self, *args, **kwargs):
        budget = self.payload.max_requeues
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) >= budget:
            return None  # submitit then ends the job with "checkpoint function returned None"
        return submitit.helpers.DelayedSubmission(StageJob(self.payload))

    def __call__(self) -> dict:
        payload, job, task = self.payload, self.payload.job, self.payload.task
        ctx = JobContext(payload)
        restarts = ctx.restarts()
        ctx.event("start", restarts=restarts, host=socket.gethostname(), pid=os.getpid())
        if ctx.rank == 0:
            say(f"stage {job.stage} job {ctx.job_id} ({task.label}): {job.layout.describe()}, attempt {restarts + 1}"
                + (f" (requeued {restarts} time(s), --max-requeues {payload.max_requeues})" if restarts else ""))
        watch = None
        started = time.time()
        try:
            if payload.cluster == "slurm":
                check_layout(job.layout)
            if payload.cluster == "slurm" and restarts > payload.max_requeues:
                raise StageFailed(f"job {ctx.job_id} was requeued {restarts} times, more than --max-requeues "
                                  f"{payload.max_requeues}: giving up (the outputs so far are kept; resubmit to "
                                  f"continue)")
            if payload.cluster == "local":
                _export_local_world(ctx)
            watch = PreemptionWatch(ctx, os._exit).start()
            if task.demo_data:
                _demo_data(task.demo_data, payload.folder)
            for step in task.steps:
                rc = run_step(step, ctx.rank)
                if rc == EXIT_PREEMPTED:
                    return self._preempted(ctx, watch, step)
                if rc not in step.ok:
                    raise StageFailed(f"{step.command()} exited with status {rc}")
        except BaseException as exc:
            if isinstance(exc, SystemExit) and exc.code == LOCAL_REQUEUE_EXIT:
                raise
            if isinstance(exc, KeyboardInterrupt) and ctx.requeue_outcome == "requeued":
                say(f"stage {job.stage} stopped: the job is requeued")
                self._wait_for_stop("requeued")
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not isinstance(exc, StageFailed):
                message = f"{type(exc).__name__}: {message}"
            ctx.event("failed", message=message[:500])
            say(f"stage {job.stage} FAILED on rank {ctx.rank}: {message}")
            if not isinstance(exc, StageFailed):
                traceback.print_exc()
            raise
        finally:
            if watch is not None:
                watch.stop()
        if ctx.rank == 0:
            say(f"stage {job.stage} ({task.label}) done in {time.time() - started:.1f} s")
            ctx.event("done", seconds=round(time.time() - started, 3))
        return {"stage": job.stage, "task": task.label, "rank": ctx.rank, "seconds": round(time.time() - started, 3)}

    def _preempted(self, ctx: JobContext, watch: PreemptionWatch, step: Step) -> dict:
        """The command saved its checkpoint and exited with status 75: requeue, then wait to be stopped."""
        signals = sorted({signal.Signals(s).name for s in ctx.notices}) or ["SIGTERM"]
        ctx.event("preempted", step=step.command(), signals=signals)
        if ctx.rank == 0:
            say(f"{step.argv[0]} saved a checkpoint after {'/'.join(signals)} and stopped (status {EXIT_PREEMPTED})")
        if not ctx.notices:  # only SIGTERM: scancel, the time-limit kill or a SLURM requeue: SLURM decides
            outcome = "ending"
        else:
            outcome = ctx.requeue("/".join(signals))
        if outcome == "refused":
            raise StageFailed(f"preempted and not requeued: --max-requeues {ctx.payload.max_requeues} reached; "
                              f"the checkpoint is saved: resubmit the run to continue")
        if ctx.cluster == "local":
            watch.stop()
            sys.exit(LOCAL_REQUEUE_EXIT)
        if ctx.cluster != "slurm":
            raise StageFailed("preempted: the debug executor cannot requeue; run the stage again to resume")
        self._wait_for_stop(outcome)

    @staticmethod
    def _wait_for_stop(outcome: str, seconds: float = 300) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:  # SLURM stops every task of a requeued / ending job
            time.sleep(1)
        raise StageFailed(f"preempted ({outcome}) but the job was not stopped within {seconds:.0f} s")
