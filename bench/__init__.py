"""Benchmarks: speed, quality and orchestration figures behind BENCHMARKS.md."""
