"""`python -m bench.spend`: run the spend benchmark and print its figures (see bench/spend/run.py)."""

from bench.spend.run import main

main()
