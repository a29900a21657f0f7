"""Benchmarks of embq side by side with the raw engine, naive Celery and an embedding server.

Not tests: they measure, print one table of medians and judge nothing.
``python -m bench --quick`` runs in a few minutes; ``python -m bench`` is the full run.
"""
