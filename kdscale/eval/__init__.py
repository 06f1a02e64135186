"""Evaluation: label metrics with bootstrap CIs over cohorts and subgroups (``analysis``, on top of
``kdscale.metrics``), localization scores of saliency maps against boxes and their trivial
reference maps (``localization``), attention / Grad-CAM map extraction (``attention``), reference
rows -- teachers, ensembles, oracle ceilings -- scored like students (``references``) and warnings
about unreliable intervals (``ci_checks``).

Submodules are imported explicitly (``from kdscale.eval.analysis import evaluate``);
``localization`` depends on numpy only (``localization.upsample`` imports torch lazily).
"""
