"""Bundled sample data for the quick start and tests."""
