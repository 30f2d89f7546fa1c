"""resfused benchmarks: kernel suite (bench_bn_add_relu.py), model suite (bench_resnet.py), the runner
(run.py, `make bench`), the report generator (report.py) and the GPU check (gpu_check.sh).

A package so the suites, the runner, pytest-benchmark (`pytest bench/ --benchmark-only`) and
tests/test_bench.py share one harness (_harness.py).
"""
