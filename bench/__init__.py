"""Benchmarks. `python -m bench.offline`: the offline engine throughput/decode benchmark (optionally vs vLLM CPU)."""
