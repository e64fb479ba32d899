"""The test suite: one folder per package it tests, shared helpers in tests/helpers/. Packages
(with __init__.py) so that test modules are imported as tests.<folder>.<module> and the same
basename may appear in two folders."""
