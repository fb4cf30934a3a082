"""The application on top of the package: the ``ldp-predict`` command line (``cli.py``, Hydra configs in
``conf/``), the LightningModules that sample (``sampling/``), the writers that save predictions (``writer.py``,
``batch_job/``, ``images.py``, ``videos.py``), prompt files (``prompts.py``), the plan checker
(``plan_check.py``, ``ldp-check-plan``) and the embedded digits example (``digits/``)."""
