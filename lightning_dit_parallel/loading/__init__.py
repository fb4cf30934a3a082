"""Loading a model so that each rank reads only what it keeps: the deferred-weights mechanism (``deferred``) and
lean ``from_pretrained`` for diffusers and transformers models (``pretrained``)."""

from lightning_dit_parallel.loading.deferred import (
    DEFERRED_ATTR,
    DeferredWeights,
    build_on_meta,
    defer_weights,
    deferred_module_ids,
    deferred_roots,
    load_local_weights,
    materialize,
    parameters_on_meta,
    read_header,
    release,
    save_weights,
    weight_files,
)
from lightning_dit_parallel.loading.pretrained import checkpoint_files, lean_from_pretrained, lean_model

__all__ = [
    "DEFERRED_ATTR",
    "DeferredWeights",
    "build_on_meta",
    "checkpoint_files",
    "defer_weights",
    "deferred_module_ids",
    "deferred_roots",
    "lean_from_pretrained",
    "lean_model",
    "load_local_weights",
    "materialize",
    "parameters_on_meta",
    "read_header",
    "release",
    "save_weights",
    "weight_files",
]
