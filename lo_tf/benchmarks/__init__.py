"""Timing (paper App. B, App. F): one alternating-median harness and the benchmarks built on it."""
