"""Benchmarks and their shared code (`benchmarks.common`). They need a CUDA GPU; run each as a module from the repo
root, e.g. `python3 -m benchmarks.bench_offline --help`. Research probes are in `benchmarks.research`; results in
benchmarks/RESULTS.md; `benchmarks/gpu_session.sh` runs them on a GPU machine."""
