"""Side-by-side timings of dualenc against transformers; run with `python -m benchmarks`."""
