"""Experiments: a list of arms x seeds of real pipeline runs, aggregated into one report
(runner.py: config, plan, run; aggregate.py: per-arm statistics and the report)."""
