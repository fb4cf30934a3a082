"""A sharded encoder's token table split by rows and never gathered (``fsdp/vocab_rows.py``), as ``parallelize``
shards the encoders: UMT5 (a table tied between ``shared`` and ``encoder.embed_tokens``), CLIP's text model, Llama and
Gemma 2 (a subclass that scales the table's rows around ``super().forward``),
on 2 and 4 ranks, each rank with prompts of its own (different batch sizes and lengths, as data-parallel ranks have).

Every rank's output equals the whole encoder's (float32, relative 1e-5); the table is a DTensor of torch's chunk
sizes during every lookup (never gathered: no whole table exists on a rank while it runs), tied twins share it;
``remove()`` gives the whole table back, still tied, the modules their classes, and the plain encoder the same
outputs. Tables that another module reads otherwise (a tied output head) or a subclass that reads the weight itself
are left to FSDP.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_dit_parallel.parallel.fsdp import apply_fsdp, apply_vocab_rows, encoder_units, vocab_tables
from tests.distributed import run_on_ranks
from tests.pipelines import WORDS, clip_encoder, decoder_config, gemma2_encoder, llama_encoder, umt5_encoder
from tests.rank_outputs import max_relative_error

VOCAB = len(WORDS) + 3


ENCODERS = {
    "umt5": umt5_encoder,
    "clip": clip_encoder,
    "llama": llama_encoder,
    "gemma2": gemma2_encoder,  # its token table scaled by its own forward around super().forward
}


def _held(weight: torch.Tensor) -> tuple[bool, tuple[int, ...]]:
    """Whether ``weight`` is split, and the shape this rank holds."""
    split = isinstance(weight, DTensor)
    return split, tuple((weight.to_local() if split else weight).shape)


def _run(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, build in ENCODERS.items():
        encoder = build()
        generator = torch.Generator().manual_seed(rank)
        ids = torch.randint(2, VOCAB, (1 + rank % 2, 5 + rank), generator=generator)  # this rank's own prompts
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # padded
        with torch.no_grad():
            reference = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            tables = vocab_tables(encoder, world)
            before = [type(m) for m in tables]
            sharding = apply_fsdp(encoder, encoder_units(encoder), mesh, rows=True, ignored=[tables[0].weight])
            rows = apply_vocab_rows(encoder, tables, mesh)
            table = encoder.get_input_embeddings()
            seen: list[tuple] = []  # the table as the lookup finds it
            hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(_held(m.weight))) for m in tables]
            try:
                output = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            finally:
                for hook in hooks:
                    hook.remove()
            twins = all(m.weight is table.weight for m in tables)
            swapped = all(type(m) is not c and isinstance(m, c) for m, c in zip(tables, before))
            rows.remove()
            sharding.remove()
            after = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        results[name] = dict(
            holders=len(tables),
            seen=seen,
            twins=twins,
            error=max_relative_error(output, reference),
            after=max_relative_error(after, reference),
            plain=not isinstance(table.weight, DTensor) and table.weight.shape[0] == VOCAB,
            tied_after=all(m.weight is table.weight for m in tables),
            classes_back=swapped and [type(m) for m in tables] == before,
        )
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_token_tables_split_by_rows_equal_the_whole_encoder(world: int):
    per_rank = -(-VOCAB // world)
    for rank, results in enumerate(run_on_ranks(world, _run)):
        local = min(per_rank, max(VOCAB - rank * per_rank, 0))
        for name, r in results.items():
            assert r["holders"] == (2 if name == "umt5" else 1), (name, r)  # shared and encoder.embed_tokens
            assert r["seen"] and all(s == (True, (local, s[1][1])) for s in r["seen"]), (name, rank, r["seen"])
            assert r["twins"] and r["tied_after"] and r["plain"] and r["classes_back"], (name, r)
            assert r["error"] <= 1e-5 and r["after"] <= 1e-5, (name, rank, r)


def test_tables_read_otherwise_stay_with_fsdp():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**decoder_config(num_hidden_layers=1, tie_word_embeddings=True))
    tied_head = LlamaForCausalLM(config)
    assert tied_head.lm_head.weight is tied_head.get_input_embeddings().weight
    assert vocab_tables(tied_head, 2) == []  # the output head reads the table as a Linear

    class ReadsItsWeight(nn.Embedding):
        def forward(self, ids):
            return torch.nn.functional.embedding(ids, self.weight) * 2.0

    class Scaled(nn.Embedding):  # through super().forward, the weight's dtype only: split
        def forward(self, ids):
            return super().forward(ids) * torch.tensor(2.0, dtype=self.weight.dtype)

    class Encoder(nn.Module):
        def __init__(self, table: nn.Embedding) -> None:
            super().__init__()
            self.embed = table

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

    assert vocab_tables(Encoder(ReadsItsWeight(VOCAB, 4)), 2) == []
    assert len(vocab_tables(Encoder(Scaled(VOCAB, 4)), 2)) == 1
    assert vocab_tables(umt5_encoder(), VOCAB + 1) == []  # fewer rows than ranks
