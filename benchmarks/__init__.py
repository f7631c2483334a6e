"""Speed and memory measurements (`make bench` runs ``python -m benchmarks.run_all``).

Each ``benchmarks/bench_*.py`` module exposes ``run() -> list[tuple[str, float, str]]`` rows of
(measurement, value, unit); run_all prints them as one table. Measurements only: no assertions on time.
"""
