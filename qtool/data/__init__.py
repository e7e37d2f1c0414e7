"""Offline data: the built-in BBC News corpus, user text files, calibration artifacts, tasks."""
