"""Benchmarks run by make targets (``make bench``, ``bench-env``, ``bench-model``, ``bench-autoscale``)."""
