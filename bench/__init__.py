"""Benchmarks: run from the repository root as modules, `python -m bench.decode`, with kvbench
installed from this checkout (`pip install -e .`, or PYTHONPATH=src to measure another checkout's
code). They import the package's own byte formula (kvbench.engine.budget) and timing recipe
(kvbench.engine.timing) rather than writing their own."""
