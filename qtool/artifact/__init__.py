"""Artifacts passed between commands: checkpoints, calibration sets, task deltas."""
