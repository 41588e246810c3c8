"""Benchmarks: each script prints its figures and writes JSON (and a PNG where useful) to bench/results/."""
