"""`python -m bench.e2e`: run the end-to-end benchmark and print its figures (see bench/e2e/run.py)."""

from bench.e2e.run import main

main()
