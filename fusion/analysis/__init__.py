"""Analyses of trained models: robustness to missing and noisy modalities."""
