"""Shared test support: what the tests, the benchmarks and the chaos harness set up beside the real services."""
