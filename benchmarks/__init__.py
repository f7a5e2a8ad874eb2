"""bufbroker's benchmarks: ``python -m benchmarks [--quick] [--json] [--only a,b,...]``.

Every case is printed with p50, p99 and its ratio to a baseline measured in the same run,
interleaved with it, after warm-up (docs/PERFORMANCE.md).
"""
