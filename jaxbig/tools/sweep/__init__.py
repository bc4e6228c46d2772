"""Sweeps: a family of runs (run.py: `jaxbig sweep`) and their report (report.py: `jaxbig
report` on a sweep folder). The report imports no JAX."""
