"""The planner's layout record and the enumeration of every valid layout for a model, a world size and a work.

``PlannedLayout`` holds what ``ParallelLayout`` holds (dp, cfg, pp, ring, ulysses, tp, fsdp) plus what the planner
also models: parallel VAE decode, the pipeline schedule (micro-batches or PipeFusion patches), DistriFusion's
patch-parallel degree and host offload of the weights (the strategy's ``offload``). The mesh degrees are validated by
``ParallelLayout`` itself; what composes with what is the strategy's own rule (``parallel/composition.py``, through
``PlannedLayout.composition_problems``); the rest is checked here against the model (heads, feature counts, block
counts, what the plan supports) and the work (``degrees_allowed``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from lightning_dit_parallel.parallel.composition import composition_problems
from lightning_dit_parallel.parallel.fsdp.shard import resolve_fsdp_units
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.pipeline.options import PipelineOptions
from lightning_dit_parallel.planner.spec import ModelSpec

PipelineMode = Literal["none", "microbatch", "pipefusion"]

#: Degrees multiplied into the world size, outermost first; ``tp`` is innermost (it all-reduces every layer).
DEGREES: tuple[str, ...] = ("dp", "cfg", "pp", "ring", "ulysses", "tp", "distrifusion")


@dataclass(frozen=True)
class PlannedLayout:
    """One layout the planner considers. ``1`` means off.

    Args:
        dp, cfg, pp, ring, ulysses, tp: as in ``ParallelLayout``.
        distrifusion: DistriFusion degree: ranks that each hold the whole model and compute one patch of the
            tokens with stale keys/values of the others (approximate).
        fsdp: shard parameters over the dp, cfg, ring and ulysses axes and DistriFusion's patches (and the text
            encoder with them).
        parallel_vae: decode the latent in bands across the model-parallel group.
        pp_mode: ``"none"`` (pp = 1), ``"microbatch"`` (exact) or ``"pipefusion"`` (approximate).
        patches: PipeFusion patches per step (``pp_mode="pipefusion"``), else 0.
        offload: the weights of the blocks and encoder layers live in host memory and are streamed to the device one
            unit at a time (FSDP shards with ``CPUOffloadPolicy``, else ``offload.apply_offload``); considered only
            when no layout fits without it (``Axes.offload``).
        fsdp_units: with ``fsdp``, the FSDP units (``parallelize``'s ``fsdp_units``); ``"auto"``, the strategy's
            default, becomes ``"rows"`` (``"layers"`` with ``tp > 1``); ``"blocks"`` without ``fsdp``.
    """

    dp: int = 1
    cfg: int = 1
    pp: int = 1
    ring: int = 1
    ulysses: int = 1
    tp: int = 1
    distrifusion: int = 1
    fsdp: bool = False
    parallel_vae: bool = False
    pp_mode: PipelineMode = "none"
    patches: int = 0
    offload: bool = False
    fsdp_units: str = "auto"

    def __post_init__(self) -> None:
        if self.fsdp_units == "auto":
            object.__setattr__(self, "fsdp_units", resolve_fsdp_units("auto", self.tp) if self.fsdp else "blocks")
        if self.distrifusion > 1 and self.ring > 1:
            raise ValueError(
                f"DistriFusion's patches are the ring axis: ring must be 1 with it; got {self.describe()}."
            )
        self.to_parallel_layout()  # the mesh degrees' own checks
        bad = {
            k: getattr(self, k)
            for k in ("distrifusion",)
            if not (isinstance(getattr(self, k), int) and getattr(self, k) >= 1)
        }
        if bad:
            raise ValueError(f"Degrees must be positive integers; got {bad} in {self.describe()}.")
        if self.fsdp_units not in ("blocks", "layers", "rows") or (self.fsdp_units != "blocks" and not self.fsdp):
            raise ValueError(f"fsdp_units must be 'blocks', or 'layers' or 'rows' with fsdp; got {self.fsdp_units!r}.")
        if self.fsdp:
            resolve_fsdp_units(self.fsdp_units, self.tp)  # refuses rows streaming with tensor parallelism
        if (self.pp > 1) != (self.pp_mode != "none"):
            raise ValueError(f"pp_mode must be 'none' exactly when pp == 1; got {self.describe()}.")
        if (self.pp_mode == "pipefusion") != (self.patches > 0):
            raise ValueError(f"patches > 0 exactly with pp_mode='pipefusion'; got {self.describe()}.")

    @property
    def world_size(self) -> int:
        return math.prod(getattr(self, d) for d in DEGREES)

    @property
    def sequence_degree(self) -> int:
        return self.ring * self.ulysses

    @property
    def model_parallel_degree(self) -> int:
        """Ranks working on one batch: everything but ``dp``."""
        return self.world_size // self.dp

    @property
    def shard_degree(self) -> int:
        """Ranks one FSDP shard group spans (1 without FSDP): the dp, cfg, ring and ulysses axes (DistriFusion's
        patches are the ring axis)."""
        return self.dp * self.cfg * self.ring * self.ulysses * self.distrifusion if self.fsdp else 1

    @property
    def encoder_shard_degree(self) -> int:
        """Ranks the pipeline's encoders are sharded over by default (``fsdp.encoder_mesh``): every model-parallel
        rank, and the dp axis with FSDP, when the layout cuts the DiT's memory (FSDP, pipeline stages or tensor
        parallelism); else 1."""
        from lightning_dit_parallel.parallel.fsdp.mesh import shards_encoders

        if not shards_encoders(self.fsdp, self.pp, self.tp):
            return 1
        return self.model_parallel_degree * (self.dp if self.fsdp else 1)

    @property
    def exact(self) -> bool:
        return self.pp_mode != "pipefusion" and self.distrifusion == 1

    def degrees(self) -> dict[str, int]:
        return {d: getattr(self, d) for d in DEGREES}

    def as_dict(self) -> dict:
        """Every field by name (the JSON ``"layout"`` object)."""
        return asdict(self)

    def describe(self) -> str:
        """Short name: the degrees above 1 and the options, e.g. ``ulysses8+fsdp`` or ``cfg2 x pp2(pipefusion M=4)``."""
        parts = []
        for d in DEGREES:
            value = getattr(self, d)
            if value > 1:
                part = f"{d}{value}"
                if d == "pp":
                    part += f"({self.pp_mode}{f' M={self.patches}' if self.patches else ''})"
                parts.append(part)
        text = " x ".join(parts) or "1 device"
        if self.fsdp:
            default = self.fsdp_units == resolve_fsdp_units("auto", self.tp)  # the strategy's default units
            text += " +fsdp" if default else f" +fsdp({self.fsdp_units})"
        if self.parallel_vae:
            text += " +pvae"
        if self.offload:
            text += " +offload"
        return text

    def to_parallel_layout(self) -> ParallelLayout:
        """The ``ParallelLayout`` of the mesh degrees; DistriFusion's patches are its ring axis (``distrifusion=True``
        in ``composition_problems``)."""
        ring = self.ring * self.distrifusion
        return ParallelLayout(
            dp=self.dp, cfg=self.cfg, pp=self.pp, ring=ring, ulysses=self.ulysses, tp=self.tp, fsdp=self.fsdp
        )

    def pipeline_options(self) -> PipelineOptions | None:
        """The strategy's ``PipelineOptions`` of this schedule (``None`` without pipeline stages)."""
        if self.pp_mode == "none":
            return None
        if self.pp_mode == "pipefusion":
            return PipelineOptions("pipefusion", self.patches)
        return PipelineOptions()

    def composition_problems(self) -> list[str]:
        """The runtime's verdict on this layout (``parallel/composition.py``): why it does not compose, ``[]`` when it
        does. The planner lists only layouts without problems."""
        return composition_problems(
            self.to_parallel_layout(), pipeline=self.pipeline_options(), distrifusion=self.distrifusion > 1
        )


@dataclass(frozen=True)
class Axes:
    """Which kinds of parallelism to enumerate (the strategy's ``auto`` mode passes what it can run).

    Args:
        tp: tensor parallelism.
        cfg: CFG parallelism (``cfg > 1``).
        parallel_vae: parallel VAE decode.
        pipefusion: PipeFusion schedules (approximate).
        distrifusion: DistriFusion (approximate).
        fsdp_layers: also the FSDP layouts with the other units (``fsdp_units="blocks"`` and ``"layers"``: more held
            while a unit runs, the all-gathers prefetched on a GPU) next to the default's (``"rows"``, ``"layers"``
            with tensor parallelism). Off by default: the default's units hold the least.
        offload: host offload of the weights (``PlannedLayout.offload``), only when no layout fits without it. Off by
            default: streaming the weights every step is slow, so it is asked for (``ldp-plan --offload``,
            ``DiTParallelStrategy(auto=True, offload=True)``).
    """

    tp: bool = True
    cfg: bool = True
    parallel_vae: bool = True
    pipefusion: bool = True
    distrifusion: bool = True
    fsdp_layers: bool = False
    offload: bool = False


def factorizations(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every ordered tuple of ``parts`` positive integers whose product is ``n``."""
    if parts == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in factorizations(n // d, parts - 1):
                yield (d, *rest)


def enumerate_layouts(
    spec: ModelSpec,
    world: int,
    *,
    rows: int,
    tokens: int,
    latent_height: int,
    samples: int,
    batch: int,
    cfg_split: bool,
    has_vae: bool,
    cfg_separate: bool = False,
    axes: Axes = Axes(),
) -> Iterator[PlannedLayout]:
    """Every layout of ``world`` ranks that the package can run for this model and work.

    Args:
        spec: the model.
        world: devices x nodes.
        rows: rows of one DiT call (the doubled batch with CFG in one call).
        tokens: latent tokens (the image/video sequence).
        latent_height: latent rows (bands of the parallel VAE).
        samples: samples to generate in all (a data-parallel group needs at least one batch).
        batch: samples per call of one data-parallel group.
        cfg_split: whether the DiT receives the doubled (unconditional, conditional) batch in one call.
        cfg_separate: whether guidance makes two DiT calls per step (CFG parallel gives each rank one of them).
        has_vae: whether a VAE that decodes in bands is known (parallel VAE decode is considered).
        axes: which kinds to enumerate.
    """
    for dp, cfg, pp, ring, ulysses, tp, distri in factorizations(world, len(DEGREES)):
        if distri > 1 and ring > 1:
            continue  # not a layout: DistriFusion's patches are the ring axis
        if not degrees_allowed(
            spec, dp, cfg, pp, ring, ulysses, tp, distri, rows, tokens, samples, batch, cfg_split, axes, cfg_separate
        ):
            continue
        shard_group = dp * cfg * ring * ulysses * distri
        model_group = world // dp
        modes: list[tuple[PipelineMode, int]] = [("none", 0)]
        if pp > 1:
            modes = [("microbatch", 0)]
            if axes.pipefusion and not spec.pipefusion_unsupported:
                # patches are runs as even as possible (pipeline/patches.py): any count up to the tokens works
                modes += [("pipefusion", m) for m in (pp, 2 * pp, 4 * pp) if m <= tokens]
        for mode, patches in modes:
            # FSDP over one rank shards nothing: the same layout as without it, listed once
            for fsdp in (False, True) if shard_group > 1 else (False,):
                if fsdp and dp > 1 and samples % (dp * batch):
                    continue  # FSDP all-gathers span the dp groups: every group must run as many batches
                if fsdp and cfg > 1 and cfg_separate:
                    continue  # CFG over separate calls refuses FSDP over the cfg axis (guidance/: docs/methods/cfg.md)
                vae_options = (
                    (False, True)
                    if (axes.parallel_vae and has_vae and model_group > 1 and latent_height >= model_group)
                    else (False,)
                )
                for parallel_vae in vae_options:
                    layout = PlannedLayout(dp, cfg, pp, ring, ulysses, tp, distri, fsdp, parallel_vae, mode, patches)
                    if not layout.composition_problems():  # the strategy's own rule of what composes
                        yield layout


def degrees_allowed(
    spec: ModelSpec,
    dp: int,
    cfg: int,
    pp: int,
    ring: int,
    ulysses: int,
    tp: int,
    distri: int,
    rows: int,
    tokens: int,
    samples: int,
    batch: int,
    cfg_split: bool,
    axes: Axes,
    cfg_separate: bool = False,
) -> bool:
    """Whether the model, the work and ``axes`` allow these degrees. What composes with what is not decided here but
    by ``composition_problems`` (the strategy's rule); these are the model's limits (heads, feature counts, blocks,
    what its plan supports) and the work's (rows to split, samples per data-parallel group, tokens per patch)."""
    if cfg > 2 or (cfg == 2 and not cfg_separate and (not cfg_split or rows % 2)):
        return False  # a CFG pair splits the doubled batch's rows, or takes one of two separate calls each
    if dp > max(1, -(-samples // batch)):
        return False  # Lightning's predict sampler refuses more data-parallel groups than batches
    if (tp > 1 and not axes.tp) or (distri > 1 and not axes.distrifusion) or (cfg > 1 and not axes.cfg):
        return False
    if any(h % (ulysses * tp) for h in spec.head_counts()):
        return False
    if tp > 1 and (spec.tp_unsupported or any(n % tp for n in spec.tp_sizes)):
        return False
    if pp > 1 and (spec.pipeline_unsupported or pp > spec.num_blocks):
        return False
    if pp > 1 and ring * ulysses > 1 and spec.pipeline_with_sequence_reason(pp):
        return False
    if (ring > 1 or distri > 1) and spec.ring_unsupported:
        return False  # the attention needs the whole sequence on a rank: Ulysses only
    if distri > 1 and tokens < distri:
        return False  # a DistriFusion patch needs a token (its patches are padded like shards)
    if ring * ulysses > 1 and not spec.self_attention and not any(a.kind == "linear" for a in spec.attention):
        return False
    return True
