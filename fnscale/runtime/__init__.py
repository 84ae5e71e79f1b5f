"""Run machinery: distribution, checkpoints, atomic writes, the metrics log, trackers."""
