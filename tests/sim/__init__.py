"""Simulations run by make targets (``make sim-autoscale``); their tests are tests/test_*.py."""
