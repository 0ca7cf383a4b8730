"""Evaluation of UMG-CLIP checkpoints: metrics and the protocols behind ``umg eval`` (docs/evaluation.md)."""
