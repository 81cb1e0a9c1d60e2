"""benchmarks/prompt_cache_read.py runs, at a small shape."""

import prompt_cache_read


def test_the_prompt_cache_read_benchmark_runs():
    """Every prompt read back in its shape (the script asserts it), the size as its shards'."""
    r = prompt_cache_read.measure(prompts=8, per_iteration=4, shape=(5, 16, 8), draws=2)
    assert r["read_median_ms"] > 0 and 0 < r["mib_per_prompt"] < 0.01
