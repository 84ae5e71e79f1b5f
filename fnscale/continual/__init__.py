"""Continual learning: the sequence file, the accuracy matrix and its metrics, EWC, protect-as-you-go, benchmarks."""
