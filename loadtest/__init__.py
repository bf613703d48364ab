"""Benchmarks and the multi-region load test; each runs by hand or as `keyrelay loadtest ...`."""
