"""CUDA graphs for static-shape decode steps: one captured graph per input signature, replayed every later step.

Why: at batch 1 a GPU decode step is hundreds of small kernels (GPT-B: ~30 a layer) whose launch costs the CPU
more time than the GPU spends running them; a replayed graph launches them all at once. The steps
:func:`varkit.compiled.compile_step` serves (raster rows and NAR fronts, VAR's scales, DD passes) already keep
every shape static, so each is captured as it is, eagerly (no inductor compile: milliseconds, not minutes), or
with ``inductor=True`` after inductor fused it.

What a replay needs that an eager call does not:

- fixed addresses. Arguments a step only reads (tokens, positions, VAR's modulations) are copied into the graph's
  own input buffers before each replay. Arguments it writes in place (the KV cache's ``keys``/``values`` lists)
  cannot be copied in and out each step, so they are *bound*: :class:`StaticBuffers` keeps one set of tensors per
  cache shape, shared by every graph of a generator (VAR's ten scale graphs write the same cache), and a new
  cache of that shape has its content copied in and its list entries replaced by the bound tensors. A cache
  that is still alive when another takes the buffers gets a copy of its own first, so two caches never share.
- no host synchronisation inside the step (the steps have none: positions are tensors, masks are built on the
  device).

The first call of a signature runs the step eagerly on a side stream (its result is returned, and its cache
writes are the ones the replay would make), then captures it; graphs share one memory pool. Outputs are
cloned, so a caller may keep them across steps.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

#: parameter names of a step's forward that it writes in place (a KV cache's buffers)
MUTATED_ARGS = ("keys", "values")


def _signature(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


class StaticBuffers:
    """The tensors a generator's graphs write in place, one set per (list length, shapes, dtype, device).

    :meth:`bind` hands a caller's list (a KVCache's ``k`` or ``v``) the set of its signature: the list's
    entries are replaced by the set's tensors (after copying their content in), so the cache keeps working
    eagerly too (prefill, rollback, continuous batching read and write through the same lists).
    """

    def __init__(self) -> None:
        self._slots: dict[tuple, list] = {}  # signature -> [static tensors, the list that holds them now]

    def bind(self, tensors: list[torch.Tensor], role: str = "") -> list[torch.Tensor]:
        """The static tensors for ``tensors``' signature in ``role`` (a cache's keys and values have the same
        shapes but never share tensors), now also ``tensors``' own entries."""
        if not isinstance(tensors, list):
            raise TypeError(f"a step's in-place arguments are lists of tensors (a KVCache's k/v), got {type(tensors).__name__}")
        key = (role, *(_signature(t) for t in tensors))
        slot = self._slots.get(key)
        if slot is None:
            self._slots[key] = [list(tensors), tensors]
            return self._slots[key][0]
        static = slot[0]
        if all(a is b for a, b in zip(tensors, static)):
            slot[1] = tensors
            return static
        # another list takes the buffers: the list that holds them keeps its content in tensors of its own,
        # unless nothing but this slot references it (its cache is gone). 2 = the slot's reference + getrefcount's
        if slot[1] is not tensors and sys.getrefcount(slot[1]) > 2 and all(a is b for a, b in zip(slot[1], static)):
            slot[1][:] = [s.clone() for s in static]
        with torch.no_grad():
            for i, (s, t) in enumerate(zip(static, tensors)):
                s.copy_(t)
                tensors[i] = s
        slot[1] = tensors
        return static

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self._slots.values() for t in slot[0])


class _Captured:
    """One graph: its input buffers (the read-only tensor leaves) and its outputs."""

    def __init__(self, graph: Any, inputs: list[torch.Tensor], outputs: list[torch.Tensor], spec: Any):
        self.graph, self.inputs, self.outputs, self.spec = graph, inputs, outputs, spec


class GraphedStep:
    """``fn`` (a static-shape step) through CUDA graphs; a callable with ``fn``'s signature.

    ``mutated``: the positions of the arguments ``fn`` writes in place (lists of tensors), bound through
    ``buffers`` (shared by every step of one generator). Every other tensor argument is copied into the graph's
    input buffers before a replay. Non-tensor arguments are part of the graph's key (keep them fixed).
    """

    def __init__(self, fn: Callable[..., Any], mutated: Sequence[int] = (), buffers: StaticBuffers | None = None,
                 pool: Any = None, capture: bool = True, names: Sequence[str] | None = None):
        self.fn = fn
        self.mutated = tuple(mutated)
        self.roles = tuple(names[i] if names else str(i) for i in self.mutated)  # binding roles, shared by name
        self.buffers = buffers if buffers is not None else StaticBuffers()
        self.pool = pool
        self.capture = capture  # False: bind and key as on CUDA but call fn eagerly (the CPU tests of this module)
        self.graphs: dict[tuple, _Captured] = {}
        self.captures = 0

    def __call__(self, *args: Any) -> Any:
        args = list(args)
        for i, role in zip(self.mutated, self.roles):
            args[i] = self.buffers.bind(args[i], role)
        read = [a for i, a in enumerate(args) if i not in self.mutated]
        leaves, spec = tree_flatten(read)
        key = (str(spec), tuple(_signature(x) if isinstance(x, torch.Tensor) else ("value", x) for x in leaves),
               tuple(id(args[i][0]) if args[i] else None for i in self.mutated))
        if not self.capture:
            self.graphs.setdefault(key, _Captured(None, [], [], spec))
            return self.fn(*args)
        entry = self.graphs.get(key)
        if entry is None:
            return self._capture(key, args, leaves, spec)
        with torch.no_grad():
            for buf, x in zip(entry.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
                buf.copy_(x, non_blocking=True)
        entry.graph.replay()
        return tree_unflatten([o.clone() for o in entry.outputs], entry.spec)

    def _capture(self, key: tuple, args: list, leaves: list, spec: Any) -> Any:
        """Run ``fn`` eagerly on a side stream (warm-up: cuBLAS handles, inductor's compile), then capture it on
        input buffers of its own; the eager result is this call's."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = self.fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        inputs = [x.clone() for x in leaves if isinstance(x, torch.Tensor)]
        it = iter(inputs)
        static_leaves = [next(it) if isinstance(x, torch.Tensor) else x for x in leaves]
        static_read = iter(tree_unflatten(static_leaves, spec))
        static_args = [args[i] if i in self.mutated else next(static_read) for i in range(len(args))]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*static_args)
        outputs, out_spec = tree_flatten(out)
        self.graphs[key] = _Captured(graph, inputs, outputs, out_spec)
        self.captures += 1
        return result


def _parameter_names(forward: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(forward).parameters if p != "self"]


def mutated_positions(forward: Callable[..., Any]) -> tuple[int, ...]:
    """Positions (after ``self``) of ``forward``'s parameters named in :data:`MUTATED_ARGS`."""
    return tuple(i for i, n in enumerate(_parameter_names(forward)) if n in MUTATED_ARGS)


class GraphSet:
    """What the CUDA graphs of one generator share: the bound in-place buffers and one memory pool."""

    def __init__(self, capture: bool = True):
        self.buffers = StaticBuffers()
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.capture = capture
        self.steps: list[GraphedStep] = []

    def wrap(self, fn: Callable[..., Any], forward: Callable[..., Any]) -> GraphedStep:
        """``fn`` (a step with ``forward``'s signature) through CUDA graphs of this set."""
        step = GraphedStep(fn, mutated_positions(forward), self.buffers, self.pool, self.capture,
                           _parameter_names(forward))
        self.steps.append(step)
        return step

    @property
    def captures(self) -> int:
        return sum(s.captures for s in self.steps)
