"""Helpers that the tests and benchmarks share (not used by the package at run time): timing of multi-rank
benchmarks (``timing.py``), counting the bytes a rank sends (``comm_counter.py``, ``funcol_counter.py``),
measuring a call's collectives against the planner's prediction (``measure.py``) and reading back written videos
(``videos.py``)."""
