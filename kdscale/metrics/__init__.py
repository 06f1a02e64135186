"""Metrics below every stage that reports them (training, the teacher checks, evaluation):
``classification`` (AUROC, AUPRC, bootstrap CIs, calibration) and ``utilization`` (d_util).
numpy only."""
