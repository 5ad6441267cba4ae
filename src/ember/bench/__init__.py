"""Benchmarks: load, engine and serving measurements."""
