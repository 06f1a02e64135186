"""Evaluation: label metrics with bootstrap CIs (``metrics``), localization scores of saliency maps
against boxes (``localization``), and attention / Grad-CAM map extraction (``attention``).

Submodules are imported explicitly (``from kdscale.eval.metrics import bootstrap_ci``); ``metrics``
and ``localization`` depend on numpy only (``localization.upsample`` imports torch lazily).
"""
