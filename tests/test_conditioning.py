"""Conditioning adapters: misuse is a clear ValueError (no process group)."""

from __future__ import annotations

import types

import pytest
import torch

from lightning_dit_parallel.app.sampling import FluxConditioning, TextConditioning


def test_flux_guidance_mismatch_names_both_values():
    model = types.SimpleNamespace(config=types.SimpleNamespace())  # a config without guidance_embeds
    with pytest.raises(ValueError, match="guidance_embeds=False needs embedded_guidance .* got embedded_guidance=3.5"):
        FluxConditioning(2, 2, embedded_guidance=3.5)(model, torch.zeros(1, 4, 16), torch.ones(1), {}, False)


def test_missing_text_embedding_names_the_batch_keys():
    with pytest.raises(ValueError, match=r"no 'prompt_embeds' \(keys: \['index'\]\)"):
        TextConditioning(out_channels=4)(None, torch.zeros(1, 4, 2, 2), torch.ones(1), {"index": torch.zeros(1)}, True)
