"""Prompt requests for ``PipelineSampler``: prompts given as a list or read from a text file (one per line)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


class PromptRequests(Dataset):
    """Request ``i``: ``{"index": i, "prompt": prompts[i]}``, plus ``"negative_prompt"`` when one is given.

    Args:
        prompts: the prompts; or ``None`` and give ``file``.
        file: a UTF-8 text file with one prompt per line (blank lines are skipped).
        negative_prompt: one negative prompt for every request (``None``: the pipeline's default).
    """

    def __init__(
        self,
        prompts: Sequence[str] | str | None = None,
        file: str | Path | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        if (prompts is None) == (file is None):
            raise ValueError("Give the prompts either as a list (data.prompts) or as a file (data.file), not both.")
        if file is not None:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
            prompts = [line.strip() for line in lines if line.strip()]
        elif isinstance(prompts, str):
            prompts = [prompts]
        self.prompts = [str(p) for p in prompts]
        if not self.prompts:
            raise ValueError("No prompts given (the list or the file is empty).")
        self.negative_prompt = negative_prompt

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        request: dict[str, Any] = {"index": torch.tensor(i), "prompt": self.prompts[i]}
        if self.negative_prompt is not None:
            request["negative_prompt"] = self.negative_prompt
        return request


def prompt_loader(
    prompts: Sequence[str] | str | None = None,
    file: str | Path | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 1,
) -> DataLoader:
    """A ``DataLoader`` over ``PromptRequests`` (in order; the writer orders the outputs by index anyway)."""
    return DataLoader(PromptRequests(prompts, file, negative_prompt), batch_size=batch_size, shuffle=False)
