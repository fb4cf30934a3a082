"""Plans translated from diffusers' own context-parallel plan (``_cp_plan``), for diffusers classes without a
shipped plan.

A diffusers model class may declare where diffusers' context parallelism cuts and gathers tensors
(``diffusers/models/_modeling_parallel.py``): per module path (``""`` is the model itself, one ``*`` stands for
every entry of a ``ModuleList``) either ``{argument name or output index: ContextParallelInput(split_dim,
expected_dims, split_output)}`` or ``ContextParallelOutput(gather_dim)``; diffusers' attention backend then attends
over whatever was cut. A ``DiTPlan`` says more, and the translation reads the rest from the model:

* **Sequence names** come from diffusers' names of the cut arguments, outputs and modules: a name with a word
  ``encoder``, ``txt``, ``text``, ``context``, ``prompt`` or ``caption`` carries ``"text"``, one with ``audio``
  ``"audio"``, any other ``"latent"`` (``hidden_states``, ``img_ids``, ``timestep``, ``proj_out``). The elements
  of a cut tuple output are named after the variables the module's forward returns (``return vid_freqs,
  txt_freqs``: latent, text; ``return freqs_cos, freqs_sin``: latent, latent).
* **Attention modules** are the outermost diffusers ``Attention`` / ``AttentionModuleMixin`` modules inside the block
  lists (one outside them, as MiniMax-H3's text refiner, runs before the cuts or after the gathers, as it is). One is
  cross-attention when it says so (``is_cross_attention``) or when its caller passes it an
  ``encoder_hidden_states`` and it has no added key/value projections (``added_kv_proj_dim``). With added
  projections and a context it is joint self-attention over text and latent tokens, in the order its processor's
  ``torch.cat`` puts them. Any other is self-attention over the latent tokens, or over text and latent tokens in
  the order its caller's forward concatenates them (single-stream blocks).
* **Blocks** are the model's ``ModuleList`` children that hold attention modules, in registration order.

A ``_cp_plan`` entry on one module becomes a cut of ``split_inputs`` (the model), ``split_module_inputs`` (a
module) or ``split_outputs`` (``split_output=True``); an entry with ``*`` is cut at every call of every block
(``split_module_inputs_each_call``); ``expected_dims`` becomes ``Split.ndim`` (a tensor with another number of dims
is left whole, as diffusers does); a ``ContextParallelOutput`` becomes a ``gather_outputs`` entry (when the plan cuts
one sequence, every gather is of that sequence, whatever the module's name: MiniMax-H3's ``audio_proj_out`` runs over
the whole packed sequence). A key naming an entry past the end of a ``ModuleList`` names nothing: diffusers' plans list
every block of their largest config (Helios: blocks 0-39).

A sequence the ``_cp_plan`` cuts but no self-attention attends over (LTX's text, which only cross-attention reads,
relying on diffusers' attention backend to gather its keys) is left whole: cross-attention here reads replicated
context, which is exact. An attention module over whole sequences only runs as it is on every rank. What a
translated plan cannot make exact (attention over cut and whole sequences together, cross-attention whose keys are
a cut sequence, as LTX-2's video-to-audio attention) raises a ``ValueError`` naming what is missing.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import inspect
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import nn

from lightning_dit_parallel.plan import DiTPlan, Split, SplitSpec

LATENT, TEXT, AUDIO = "latent", "text", "audio"
#: Words of a diffusers name that mark the text stream, and the audio stream; any other name is the latent stream.
TEXT_WORDS = frozenset({"encoder", "txt", "text", "context", "prompt", "caption"})
AUDIO_WORDS = frozenset({"audio"})
#: diffusers' name of the context argument of an attention module, and the role's context when it gets none.
CONTEXT_ARGUMENT = "encoder_hidden_states"
NO_CONTEXT, UNREADABLE_CONTEXT = "", "?"
_CONCAT_FUNCTIONS = frozenset({"cat", "concat", "concatenate"})


def has_cp_plan(module: nn.Module | type) -> bool:
    """Whether the class carries a non-empty diffusers ``_cp_plan``."""
    cls = module if isinstance(module, type) else type(module)
    return bool(getattr(cls, "_cp_plan", None))


def sequence_named(name: str) -> str:
    """The sequence a tensor named ``name`` in diffusers' code carries: ``"text"``, ``"audio"`` or ``"latent"``."""
    words = set(re.split(r"[^a-z]+", name.lower()))
    if words & TEXT_WORDS:
        return TEXT
    if words & AUDIO_WORDS:
        return AUDIO
    return LATENT


@dataclass(frozen=True)
class AttentionRole:
    """What one attention module does under sequence parallelism, and why the translation thinks so.

    Args:
        path: module path in the model.
        kind: ``"self"`` (attends over cut sequences) or ``"cross"`` (keys and values are context).
        order: for self-attention, the sequences in the order its ``F.scaled_dot_product_attention`` call holds them.
        context: the sequence its caller passes as ``encoder_hidden_states``: ``NO_CONTEXT`` for none,
            ``UNREADABLE_CONTEXT`` for an expression without a name, ``None`` when the calls do not say.
        reason: how the role was read from the model, for messages.
    """

    path: str
    kind: Literal["self", "cross"]
    order: tuple[str, ...] = ()
    context: str | None = None
    reason: str = ""


def attention_roles(model: nn.Module) -> list[AttentionRole]:
    """The role of every outermost diffusers attention module of ``model`` (see the module docstring).

    Raises:
        ValueError: for joint attention whose processor's concatenation order cannot be read, or a caller that
            concatenates text and latent tokens in more than one order.
    """
    roles: list[AttentionRole] = []
    found: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(f"{outer}.") for outer in found) or not _is_attention(module):
            continue
        found.append(path)
        roles.append(_role(model, path, module))
    return roles


def block_lists(model: nn.Module) -> tuple[str, ...]:
    """The model's ``ModuleList`` children that hold attention modules, in registration order."""
    return tuple(
        name
        for name, child in model.named_children()
        if isinstance(child, nn.ModuleList) and any(_is_attention(m) for m in child.modules())
    )


def translate_cp_plan(model: nn.Module) -> DiTPlan:
    """The ``DiTPlan`` of a diffusers model from its class's ``_cp_plan`` and its attention modules.

    Raises:
        ValueError: when the class has no ``_cp_plan``, when an entry names no module or uses a form this package
            cannot honour (a gathered tuple output, an output index without ``split_output``), when diffusers' own
            context parallelism is enabled on the model, or when the result would not be exact (an attention over
            cut and whole sequences together, cross-attention to a cut sequence, a gather of a sequence nothing
            cuts); the message names the class, the entry and what is missing.
    """
    cls = type(model)
    where = f"{cls.__name__}._cp_plan"
    cp_plan = getattr(cls, "_cp_plan", None)
    if not cp_plan:
        raise ValueError(f"{cls.__name__} has no diffusers _cp_plan to translate.")
    enabled = [p for p, m in model.named_modules() if getattr(getattr(m, "processor", None), "_parallel_config", None)]
    if enabled:
        raise ValueError(
            f"{where}: diffusers' own context parallelism is enabled on {cls.__name__} (attention processors of"
            f" {enabled[:3]} have a _parallel_config); its attention backend would cut the sequence a second time."
            " Use the model without enable_parallelism()."
        )
    cuts = _read_cp_plan(model, cp_plan, where)
    blocks = block_lists(model)
    # attention outside the block lists (MiniMax-H3's text refiner) runs before any cut or after the gathers: as it is
    roles = [r for r in attention_roles(model) if any(r.path.startswith(f"{b}.") for b in blocks)]
    cut = cuts.sequences()

    def fail(what: str) -> ValueError:
        return ValueError(f"{where} cannot be translated exactly: {what} Declare a plan with register_plan.")

    attending = []  # self-attention over cut sequences; one over whole sequences only runs as it is, on every rank
    for role in (r for r in roles if r.kind == "self"):
        whole = [s for s in role.order if s not in cut]
        if whole and len(whole) < len(role.order):
            raise fail(
                f"{role.path} attends over {role.order} ({role.reason}), but the _cp_plan cuts only {sorted(cut)} and"
                f" leaves {whole} whole, for diffusers' attention backend to handle."
            )
        if not whole:
            attending.append(role)
    if not attending:
        raise fail(
            f"no attention module of {cls.__name__} (diffusers Attention or AttentionModuleMixin) attends over the cut"
            f" sequences {sorted(cut)}; found {[(r.path, r.kind, r.order) for r in roles]}."
        )
    if len(cut) == 1:
        # with one cut sequence, every gathered output carries it, whatever its name says (MiniMax-H3 runs proj_out
        # and audio_proj_out over the whole packed sequence, then selects each modality's rows)
        (only,) = cut
        cuts.gather_outputs = {path: replace(split, sequence=only) for path, split in cuts.gather_outputs.items()}
    gathered = {split.sequence: path for path, split in cuts.gather_outputs.items()}
    never_cut = {s: path for s, path in gathered.items() if s not in cut}
    if never_cut:
        raise fail(
            f"it gathers {never_cut} (sequence: module), which no entry cuts (sequence names are read from diffusers'"
            " names of the arguments and modules)."
        )
    # a cut sequence no self-attention attends over (text that only cross-attention reads) is left whole
    attended = {s for role in attending for s in role.order}
    cuts.leave_whole({s for s in cut - attended if s not in gathered})
    cut = cuts.sequences()
    cross = [r for r in roles if r.kind == "cross"]
    for role in cross:
        if role.context in cut or (role.context in (None, UNREADABLE_CONTEXT) and cut - attended):
            context = repr(role.context) if role.context in cut else "a context it cannot read"
            raise fail(
                f"cross-attention {role.path} reads {context} as keys and values while the _cp_plan cuts"
                f" {sorted(cut)}; gathering them for every call needs diffusers' attention backend."
            )
    paths = [p for p, _ in model.named_modules()]
    return DiTPlan(
        split_inputs=cuts.split_inputs,
        split_module_inputs=cuts.split_module_inputs,
        split_module_inputs_each_call=cuts.split_module_inputs_each_call,
        split_outputs=cuts.split_outputs,
        gather_outputs=cuts.gather_outputs,
        blocks=blocks,
        self_attention=_patterns({r.path: r.order for r in attending}, paths, blocks),
        cross_attention=tuple(_patterns({r.path: () for r in cross}, paths, blocks)),
    )


# -- the cuts ----------------------------------------------------------------------------------------------------


@dataclass
class _Cuts:
    """The cuts and gathers of a ``_cp_plan``, in ``DiTPlan`` terms."""

    split_inputs: dict[str, SplitSpec] = field(default_factory=dict)
    split_module_inputs: dict[str, dict[str, SplitSpec]] = field(default_factory=dict)
    split_module_inputs_each_call: dict[str, dict[str, SplitSpec]] = field(default_factory=dict)
    split_outputs: dict[str, SplitSpec] = field(default_factory=dict)
    gather_outputs: dict[str, Split] = field(default_factory=dict)

    def _all(self) -> list[SplitSpec]:
        module_inputs = [*self.split_module_inputs.values(), *self.split_module_inputs_each_call.values()]
        return [
            *self.split_inputs.values(),
            *(s for args in module_inputs for s in args.values()),
            *self.split_outputs.values(),
        ]

    def sequences(self) -> set[str]:
        """Every sequence some entry cuts."""
        return {s.sequence for spec in self._all() for s in (spec if isinstance(spec, tuple) else (spec,)) if s}

    def leave_whole(self, sequences: set[str]) -> None:
        """Drop every cut of ``sequences`` (a tuple keeps its other elements' cuts)."""

        def keep(spec: SplitSpec) -> SplitSpec | None:
            if isinstance(spec, tuple):
                kept = tuple(None if s is None or s.sequence in sequences else s for s in spec)
                return kept if any(kept) else None
            return None if spec.sequence in sequences else spec

        def prune(specs: dict[str, SplitSpec]) -> dict[str, SplitSpec]:
            return {name: kept for name, spec in specs.items() if (kept := keep(spec)) is not None}

        self.split_inputs = prune(self.split_inputs)
        self.split_outputs = prune(self.split_outputs)
        for name in ("split_module_inputs", "split_module_inputs_each_call"):
            pruned = {path: prune(args) for path, args in getattr(self, name).items()}
            setattr(self, name, {path: args for path, args in pruned.items() if args})


def _read_cp_plan(model: nn.Module, cp_plan: Mapping[str, Any], where: str) -> _Cuts:
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    cuts = _Cuts()
    outputs: dict[str, dict[int, Any]] = {}
    for module_id, entry in cp_plan.items():
        paths = _expand(model, module_id, where)
        if isinstance(entry, Mapping):
            for key, spec in entry.items():
                items = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
                if not all(isinstance(s, ContextParallelInput) for s in items):
                    raise ValueError(f"{where}[{module_id!r}][{key!r}] = {spec!r} is not a ContextParallelInput.")
                if isinstance(key, int):
                    if len(items) != 1 or not items[0].split_output or module_id == "":
                        raise ValueError(
                            f"{where}[{module_id!r}][{key}]: an output index of a submodule takes one"
                            f" ContextParallelInput(split_output=True); got {spec!r}."
                        )
                    for path in paths:
                        outputs.setdefault(path, {})[key] = items[0]
                    continue
                sequence = sequence_named(key)
                if isinstance(spec, (list, tuple)):  # a tuple argument; diffusers leaves split_output elements alone
                    split = tuple(None if s.split_output else _split(sequence, s) for s in items)
                elif spec.split_output:
                    raise ValueError(f"{where}[{module_id!r}][{key!r}]: split_output=True needs an output index.")
                else:
                    split = _split(sequence, spec)
                if module_id == "":
                    cuts.split_inputs[key] = split
                    continue
                target = cuts.split_module_inputs_each_call if "*" in module_id else cuts.split_module_inputs
                for path in paths:
                    target.setdefault(path, {})[key] = split
        else:
            gathers = tuple(entry) if isinstance(entry, (list, tuple)) else (entry,)
            if not all(isinstance(g, ContextParallelOutput) for g in gathers):
                raise ValueError(
                    f"{where}[{module_id!r}] = {entry!r} is neither a dict of inputs nor a ContextParallelOutput."
                )
            if len(gathers) != 1 or module_id == "":
                what = "a tuple output" if module_id else "the model's own output"
                raise ValueError(
                    f"{where}[{module_id!r}] = {entry!r}: gathering {what} is not supported; gather the one tensor a"
                    " submodule returns."
                )
            for path in paths:
                cuts.gather_outputs[path] = Split(sequence_named(path.rsplit(".", 1)[-1]), gathers[0].gather_dim)
    modules = dict(model.named_modules())
    for path, indexed in outputs.items():
        names = returned_sequences(type(modules[path]).forward, max(indexed) + 1)
        if set(indexed) == {0}:  # diffusers treats a tensor output as a 1-tuple
            cuts.split_outputs[path] = _split(names[0], indexed[0])
        else:
            cuts.split_outputs[path] = tuple(
                _split(names[i], indexed[i]) if i in indexed else None for i in range(max(indexed) + 1)
            )
    return cuts


def _split(sequence: str, cp_input: Any) -> Split:
    return Split(sequence, cp_input.split_dim, ndim=cp_input.expected_dims)


def _expand(model: nn.Module, module_id: str, where: str) -> list[str]:
    """The module paths a ``_cp_plan`` key names (``*`` is every entry of a ``ModuleList``; an index past the end
    of a ``ModuleList`` names nothing, as diffusers' plans list every block of their largest config)."""
    if module_id.count("*") > 1:
        raise ValueError(f"{where}[{module_id!r}]: diffusers allows one '*' per module path.")
    paths = [""]
    for atom in module_id.split(".") if module_id else ():
        expanded = []
        for path in paths:
            module = model.get_submodule(path)
            if atom == "*":
                if not isinstance(module, nn.ModuleList):
                    raise ValueError(f"{where}[{module_id!r}]: '*' follows {path!r}, which is not a ModuleList.")
                expanded.extend(_join(path, str(i)) for i in range(len(module)))
            elif atom in module._modules:
                expanded.append(_join(path, atom))
            elif isinstance(module, nn.ModuleList) and atom.isdigit():
                # an entry past the end of a block list: the _cp_plan enumerates the blocks of its largest config
                # (Helios: blocks 0-39 whatever num_layers); a shallower model has nothing there
                continue
            else:
                raise ValueError(
                    f"{where}[{module_id!r}] names no module of {type(model).__name__}: {path or 'the model'} has no"
                    f" submodule {atom!r}."
                )
        paths = expanded
    return paths


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# -- reading diffusers' code -------------------------------------------------------------------------------------


def _is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return isinstance(module, (Attention, AttentionModuleMixin))


def _role(model: nn.Module, path: str, module: nn.Module) -> AttentionRole:
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    caller = type(parent)
    query, context = _call_arguments(caller.forward, attribute, module)
    joint = getattr(module, "added_kv_proj_dim", None) is not None
    if getattr(module, "is_cross_attention", None) is True:
        return AttentionRole(path, "cross", context=context, reason="is_cross_attention")
    if context not in (None, NO_CONTEXT) and not joint:
        return AttentionRole(path, "cross", context=context, reason=f"{caller.__name__}.forward passes it a context")
    if joint and context != NO_CONTEXT:
        processor = type(getattr(module, "processor", None))
        call = processor.forward if processor.__call__ is nn.Module.__call__ else processor.__call__
        orders = concat_orders(call)
        if len(orders) != 1:
            raise ValueError(
                f"{path} ({type(module).__name__}) has added key/value projections (joint attention), but the order in"
                f" which {processor.__name__} concatenates text and latent tokens cannot be read from its code (found"
                f" {list(orders)}). Declare a plan with register_plan."
            )
        return AttentionRole(
            path, "self", orders[0], reason=f"joint attention; {processor.__name__} concatenates {orders[0]}"
        )
    # a single-stream block (one attention module) may concatenate the streams before its attention
    orders = concat_orders(caller.forward) if sum(map(_is_attention, parent.children())) == 1 else ()
    if len(orders) > 1:
        raise ValueError(
            f"{caller.__name__}.forward concatenates tokens in several orders {list(orders)}; which one {path} attends"
            " over cannot be read. Declare a plan with register_plan."
        )
    if orders:
        return AttentionRole(path, "self", orders[0], reason=f"{caller.__name__}.forward concatenates {orders[0]}")
    sequence = query or sequence_named(attribute)
    return AttentionRole(path, "self", (sequence,), reason=f"self-attention over the {sequence} tokens")


@functools.cache
def _syntax(function: Callable) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None


def _base_name(node: ast.AST) -> str | None:
    """The variable an expression reads: ``x``, ``self.x``, ``x[:, :n]``, ``x.to(dtype)`` -> ``"x"``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _base_name(node.value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return _base_name(node.func.value)
    return None


@functools.cache
def concat_orders(function: Callable) -> tuple[tuple[str, ...], ...]:
    """The distinct orders of sequences that ``torch.cat`` calls in ``function`` put one after another, e.g.
    ``torch.cat([encoder_query, query], dim=1)`` -> ``(("text", "latent"),)``; concatenations within one sequence are
    ignored."""
    tree = _syntax(function)
    found: list[tuple[int, int, tuple[str, ...]]] = []
    for node in ast.walk(tree) if tree is not None else ():
        concat = isinstance(node, ast.Call) and getattr(node.func, "attr", None) in _CONCAT_FUNCTIONS
        if not (concat and node.args and isinstance(node.args[0], (ast.List, ast.Tuple))):
            continue
        names = [_base_name(e) for e in node.args[0].elts]
        if None in names:
            continue
        order: list[str] = []
        for sequence in map(sequence_named, names):
            if not order or order[-1] != sequence:
                order.append(sequence)
        if len(order) > 1 and len(set(order)) == len(order):
            found.append((node.lineno, node.col_offset, tuple(order)))
    return tuple(dict.fromkeys(order for *_, order in sorted(found)))


@functools.cache
def returned_sequences(function: Callable, length: int) -> tuple[str, ...]:
    """The sequences of the first ``length`` values ``function`` returns, named after its ``return`` statements
    (every return must agree); all ``"latent"`` when they cannot be read."""
    tree = _syntax(function)
    readings = set()
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Return) and node.value is not None:
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            names = [_base_name(v) for v in values[:length]]
            if len(names) == length and None not in names:
                readings.add(tuple(map(sequence_named, names)))
    return readings.pop() if len(readings) == 1 else (LATENT,) * length


def _call_arguments(forward: Callable, attribute: str, module: nn.Module) -> tuple[str | None, str | None]:
    """The sequences of the query input and of the context (``encoder_hidden_states``) that ``forward`` passes in
    its calls ``self.<attribute>(...)``. The query's is ``None`` when unreadable; the context's is a sequence name,
    ``NO_CONTEXT`` (absent or ``None``), ``UNREADABLE_CONTEXT`` (an expression without a name) or ``None`` (no
    call, or ``**kwargs`` that may carry it)."""
    parameters = list(inspect.signature(module.forward).parameters)
    tree = _syntax(forward)
    calls = [
        node
        for node in (ast.walk(tree) if tree is not None else ())
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attribute
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
    ]

    def argument(call: ast.Call, name: str) -> ast.AST | None:
        keywords = {k.arg: k.value for k in call.keywords if k.arg is not None}
        if name in keywords:
            return keywords[name]
        index = parameters.index(name) if name in parameters else len(call.args)
        return call.args[index] if index < len(call.args) and not isinstance(call.args[index], ast.Starred) else None

    def sequence(node: ast.AST) -> str:
        name = _base_name(node)
        return sequence_named(name) if name else UNREADABLE_CONTEXT

    queries = {sequence(node) for call in calls if (node := argument(call, "hidden_states")) is not None}
    queries.discard(UNREADABLE_CONTEXT)
    contexts: set[str | None] = set()
    for call in calls:
        node = argument(call, CONTEXT_ARGUMENT)
        if node is None and any(k.arg is None for k in call.keywords):
            contexts.add(None)  # **kwargs may carry it
        elif node is None or (isinstance(node, ast.Constant) and node.value is None):
            contexts.add(NO_CONTEXT)
        else:
            contexts.add(sequence(node))
    query = queries.pop() if len(queries) == 1 else None
    given = contexts - {NO_CONTEXT}
    context = (given.pop() if len(given) == 1 else None) if given else (NO_CONTEXT if contexts else None)
    return query, context


def _patterns(values: Mapping[str, Any], paths: list[str], blocks: tuple[str, ...]) -> dict[str, Any]:
    """``values`` by module path, with the paths of one block list that share a value as one ``*`` pattern when the
    pattern matches exactly those paths."""
    groups: dict[tuple[str, Any], list[str]] = {}
    for path, value in values.items():
        groups.setdefault((_block_pattern(path, blocks), value), []).append(path)
    result: dict[str, Any] = {}
    for (pattern, value), members in groups.items():
        if sorted(p for p in paths if fnmatch.fnmatchcase(p, pattern)) == sorted(members):
            result[pattern] = value
        else:
            result.update((p, value) for p in members)
    return result


def _block_pattern(path: str, blocks: tuple[str, ...]) -> str:
    for block_list in blocks:
        head, sep, rest = path[len(block_list) + 1 :].partition(".")
        if path.startswith(f"{block_list}.") and head.isdigit():
            return f"{block_list}.*{sep}{rest}"
    return path
