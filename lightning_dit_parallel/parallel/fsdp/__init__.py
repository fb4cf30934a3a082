"""FSDP inference: parameters sharded per transformer block over the ranks that share weights."""

from lightning_dit_parallel.parallel.fsdp.batches import check_equal_batch_counts
from lightning_dit_parallel.parallel.fsdp.encoder_rows import EncoderRows, apply_encoder_rows
from lightning_dit_parallel.parallel.fsdp.encoders import encoder_paths, keep_output_recording
from lightning_dit_parallel.parallel.fsdp.mesh import (
    ENCODER_AXES,
    SHARD_AXES,
    encoder_mesh,
    encoder_rows_mesh,
    shard_mesh,
    shards_encoders,
)
from lightning_dit_parallel.parallel.fsdp.shard import (
    WEIGHT_LAYERS,
    FSDPSharding,
    FsdpUnits,
    apply_fsdp,
    block_units,
    check_fsdp_units,
    encoder_units,
    is_sharded,
    module_units,
    resolve_fsdp_units,
    weight_layers,
)
from lightning_dit_parallel.parallel.fsdp.vocab_rows import VocabRows, apply_vocab_rows, vocab_tables

__all__ = [
    "VocabRows",
    "apply_vocab_rows",
    "vocab_tables",
    "SHARD_AXES",
    "EncoderRows",
    "apply_encoder_rows",
    "encoder_rows_mesh",
    "FSDPSharding",
    "apply_fsdp",
    "block_units",
    "check_equal_batch_counts",
    "encoder_paths",
    "encoder_units",
    "is_sharded",
    "keep_output_recording",
    "module_units",
    "shard_mesh",
    "ENCODER_AXES",
    "encoder_mesh",
    "shards_encoders",
    "FsdpUnits",
    "WEIGHT_LAYERS",
    "check_fsdp_units",
    "resolve_fsdp_units",
    "weight_layers",
]
