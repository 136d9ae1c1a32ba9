"""Inference's write side: depth jobs (create, run, delete, re-run, recover)."""
