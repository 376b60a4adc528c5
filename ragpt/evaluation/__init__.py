"""Offline evaluation: the runner, metrics with bootstrap intervals, reports."""
