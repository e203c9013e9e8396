"""Load generators and the benchmark report.

`python -m bench` runs every benchmark below (`bench.ingest`, `bench.e2e`) and rewrites bench/README.md with the
figures; each benchmark also runs on its own (`python -m bench.ingest --help`).
"""
