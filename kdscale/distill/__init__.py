"""Distillation losses (MIND, MMPKD), teacher-ensemble targets and loss weighting (docs/losses.md)."""
