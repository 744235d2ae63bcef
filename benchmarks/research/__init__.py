"""Research probes: overlap, co-running units, SM partitions, the schedule search's costs (docs/findings.md). Run
each as a module from the repo root, e.g. `python3 -m benchmarks.research.probe_corun --help`."""
