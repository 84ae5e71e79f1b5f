"""Scoring (losses shared by train and eval), reports and the sweep report."""
