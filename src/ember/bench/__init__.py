"""Benchmarks: checkpoint loading, the engine, scheduling, and serving."""
