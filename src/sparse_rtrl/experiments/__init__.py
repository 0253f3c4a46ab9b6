"""Experiment layer: run bookkeeping, sweeps, the benchmark and its reports."""
