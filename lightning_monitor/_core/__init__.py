"""Foundations every other part uses and that import nothing else of the package: the option check, the clock, the LRU
cache, warn-once, the logged-key docstrings and every private name of our dependencies."""
