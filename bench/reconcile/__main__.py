"""`python -m bench.reconcile`: run the reconciliation benchmark and print its figures (see bench/reconcile/run.py)."""

from bench.reconcile.run import main

main()
