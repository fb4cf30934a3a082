"""Text and image encoders under FSDP: which modules are sharded by default, and how a sharded transformers model
keeps the outputs it records.

``fully_shard`` turns each unit's class into a dynamic subclass ``FSDP<Name>`` (created by torch, cached per class).
transformers (from 4.56) decides which extra outputs a model records (``hidden_states``, ``attentions``, ...) by
looking up ``str(type(model))`` in ``_CAN_RECORD_REGISTRY``, filled in ``PreTrainedModel.__init__`` with the class's
``_can_record_outputs``. The subclass has no entry, so a sharded ``LlamaModel`` or ``CLIPVisionModel`` records nothing
and returns ``hidden_states=None`` even with ``output_hidden_states=True`` (diffusers' HunyuanVideo and Wan I2V
pipelines then fail on ``hidden_states[-2]``). ``keep_output_recording`` gives every such subclass its original
class's entry; the entries stay after ``remove`` (torch reuses the subclass for every module of that class).

``generate`` needs nothing here: ``fully_shard`` marks every module it manages ``_is_fsdp_managed_module``, and for such
a model transformers keeps the ranks stepping until all have finished (``synced_gpus``), so ranks whose prompts stop
at different lengths still pair every all-gather.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_dit_parallel.plan import is_within

#: Where transformers keeps its registry: ``utils.output_capturing`` (5.x), ``utils.generic`` (4.56 - 4.57).
_REGISTRY_MODULES = ("transformers.utils.output_capturing", "transformers.utils.generic")


def _recording_registry() -> dict | None:
    """transformers' map ``str(model class) -> _can_record_outputs``, or ``None`` when transformers is not imported
    (then no module is one of its models) or predates the map (then a model reads its class attribute)."""
    for name in _REGISTRY_MODULES:
        registry = getattr(sys.modules.get(name), "_CAN_RECORD_REGISTRY", None)
        if isinstance(registry, dict):
            return registry
    return None


def keep_output_recording(units: Iterable[tuple[nn.Module, type]]) -> None:
    """Give each FSDP unit's new class, for ``(unit, its class before fully_shard)`` pairs, the outputs that
    transformers records for the original class (nothing for classes that are not transformers models).

    Keys are ``str(cls)``, as transformers writes them; ``dict`` methods are used because 5.x overrides ``get`` and
    ``__setitem__`` to take a model instead of a key.

    Raises:
        ValueError: when two classes of one name record different outputs: torch gives both the same subclass
            name, so one entry cannot serve both.
    """
    registry = _recording_registry()
    if registry is None:
        return
    for unit, original in units:
        key, new_key = str(original), str(type(unit))
        if key == new_key or key not in registry:
            continue
        value = dict.get(registry, key)
        if new_key in registry and dict.get(registry, new_key) != value:
            raise ValueError(
                f"{original} is sharded as {new_key}, which another class of the same name registered with other"
                f" recorded outputs ({dict.get(registry, new_key)} != {value}); rename one of the classes."
            )
        dict.__setitem__(registry, new_key, value)


def encoder_paths(module: nn.Module, exclude: Sequence[str]) -> list[str]:
    """Paths of the outermost transformers ``PreTrainedModel`` submodules of ``module`` (text and image encoders:
    ``pipe.text_encoder``, ``pipe.image_encoder``, ...) that neither lie inside nor contain a path of ``exclude``
    (the planned DiTs). Without transformers imported there are none.

    The default ``shard_modules`` with FSDP (see ``parallelize``), like Wan's ``--t5_fsdp``.
    """
    base = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    if base is None:
        return []
    found: list[str] = []
    for path, sub in module.named_modules():
        if not isinstance(sub, base) or any(is_within(path, p) for p in found):
            continue
        if not any(is_within(path, p) or is_within(p, path) for p in exclude):
            found.append(path)
    return found
