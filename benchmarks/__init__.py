"""Load tests of serve_tp and its baselines; see benchmarks/README.md."""
