"""Benchmarks: `kvtier bench io|load|chat|agent|rag|trace` and `kvtier plan`."""
