"""sasgate's benchmarks: each figure is a ratio of two things timed side by side in one run.

Run them all with `python -m benchmarks` (see benchmarks/README.md); they are not tests.
"""
