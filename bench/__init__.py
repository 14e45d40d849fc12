"""Benchmarks and soak runs for eventrouter (not tests: nothing here asserts timings).

See bench/README.md for the one-command entry points and docs/performance.md for results."""
