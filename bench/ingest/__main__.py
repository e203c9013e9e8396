"""`python -m bench.ingest`: run the ingest benchmark and print its figures (see bench/ingest/run.py)."""

from bench.ingest.run import main

main()
