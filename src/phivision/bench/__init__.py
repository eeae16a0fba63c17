"""Training benchmarks (`phivision bench`): synthetic workloads, analytic FLOPs, timed real steps."""
