"""Per-exit evaluation, threshold calibration and plots."""
