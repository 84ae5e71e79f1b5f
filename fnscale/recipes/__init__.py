"""Workflows, each reading top to bottom: train, build networks, evaluate, sweep. Imported by the CLI only."""
