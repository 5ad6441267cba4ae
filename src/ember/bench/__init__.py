"""Benchmarks: checkpoint loading (load.py) and, later, the engine and serving."""
