"""``python -m lightning_dit_parallel``: the same command line as ``ldp-predict``."""

from lightning_dit_parallel.app.cli import main

if __name__ == "__main__":
    main()
