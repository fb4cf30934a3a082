"""The layout planner: which layouts fit and which is fastest, before anything is launched.

``plan_layouts(config_or_module, devices=8, memory="24GiB", height=720, width=1280, frames=81)`` lists every
valid layout with its memory per rank, bytes per step and estimated time, and recommends one; ``ldp-plan`` is its
command line and ``DiTParallelStrategy(auto=True)`` uses it to choose a layout at launch.
"""

from lightning_dit_parallel.planner.layouts import Axes, PlannedLayout
from lightning_dit_parallel.planner.models import PipelineModels, load_models, models_from_module
from lightning_dit_parallel.planner.planner import LayoutEstimate, Plan, estimate_layouts, plan_layouts
from lightning_dit_parallel.planner.work import Hardware, Work

__all__ = [
    "Axes",
    "Hardware",
    "LayoutEstimate",
    "Plan",
    "PlannedLayout",
    "PipelineModels",
    "Work",
    "estimate_layouts",
    "load_models",
    "models_from_module",
    "plan_layouts",
]
