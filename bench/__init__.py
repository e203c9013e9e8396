"""The benchmarks: one shared harness (bench/harness.py, bench/load.py), four benchmarks (ingest, e2e, spend,
reconcile), each a module that also runs alone (`python -m bench.ingest --help`), and `python -m bench`, which
runs them all and rewrites bench/README.md with their tables. Nothing here imports the service's packages.
"""
