"""Benchmarks of dydiff-env against the real simulator (not part of the installed package)."""
