"""Load generators and the benchmark report.

`python -m bench` runs every benchmark below (for now: `bench.ingest`) and rewrites bench/README.md with the
figures; each benchmark also runs on its own (`python -m bench.ingest --help`).
"""
