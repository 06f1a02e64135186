"""kdscale's SLURM launcher (``python launch/submit.py``).

``launch.plan`` describes the jobs (pure data), ``launch.jobs`` runs one task of a job inside
SLURM (or locally), ``launch.slurm`` talks to the scheduler, ``launch.submit`` is the command.
The jobs import ``launch.jobs`` by name, so the repository root is on their PYTHONPATH.
"""
