"""The runtime: every parallelizer in its own package and their composition on one device mesh.

``layout.py`` (the degrees and the mesh), ``nodes.py`` (mesh axes across machines), ``compose.py``
(``parallelize``: find the planned DiTs and apply the parallelizers in order), and the parallelizers:
``sequence/`` (Ulysses, Ring, USP), ``pipeline/`` (stages, micro-batches, PipeFusion), ``tensor/``, ``fsdp/``,
``guidance/`` (CFG parallel), ``distrifusion/``, ``vae/`` (parallel decode), ``cache/`` (step caching),
``offload.py`` and ``regional_compile.py``; the checks they install on a model: ``guard.py`` (replicated inputs),
``input_limits.py`` and ``incomplete.py``.
"""
