"""Hydra configs of ``ldp-predict`` (a package so that Hydra finds them inside an installed wheel)."""
