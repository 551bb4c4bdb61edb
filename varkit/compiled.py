"""One way to compile a static-shape decode step with ``torch.compile`` (inductor), shared by every generator.

A generator that offers :meth:`~varkit.models.base.Generator.compile_decoding` writes its step as a module whose
``forward`` takes tensors of fixed shapes (and lists of them), and hands it to :func:`compile_step`. That is the
one place that decides:

- the inductor settings: ``freezing`` (weights folded in as constants and prepacked for inductor's GEMMs) and
  ``max_autotune`` (inductor picks AMX / AVX-512 GEMM templates) everywhere except fp32 on the CPU, where MKL's
  eager GEMVs beat inductor's prepacked and template GEMMs (measured on GPT-B, batch 1): fp32 CPU steps fuse the
  small ops only;
- the guards: tensor inputs only (shape, dtype, device; a new batch size recompiles). The module guards would
  cost more per call than a small step and guard nothing that matters: the weights are frozen, and the callers
  call in eval mode without grad;
- the cache: every call of :func:`compile_step` gets a dynamo cache of its own. dynamo keeps compiled graphs on
  the *code object* it traced, and ``torch.compile(module)`` traces ``nn.Module``'s shared call code: with the
  module guards dropped, a second model of the same shapes would run the first one's frozen weights (it did, for
  two raster models), and every step of every model would share one recompile limit (8 by default; VAR alone has
  10 scales). Tracing a fresh copy of ``forward``'s code per step keeps graphs, guards and limits per step.
"""
from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .cuda_graphs import GraphSet


def inductor_settings(device: torch.device, dtype: torch.dtype, max_autotune: bool = True) -> dict[str, Any]:
    """The inductor config a step of weights in ``dtype`` on ``device`` compiles under (see the module docstring)."""
    packed = not (device.type == "cpu" and dtype == torch.float32)
    # CUDA: no autotuning (each GEMM's Triton candidates compile for minutes; cuBLAS serves decode shapes well)
    settings: dict[str, Any] = {"freezing": packed, "max_autotune": max_autotune and packed and device.type == "cpu"}
    if settings["max_autotune"] and device.type == "cpu":
        settings["max_autotune_gemm_backends"] = "CPP,ATEN"
    return settings


def _own_forward(step: nn.Module) -> Callable[..., Any]:
    """``step.forward`` bound to ``step``, traced from a code object no other compiled step shares."""
    f = type(step).forward
    fresh = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(fresh, step)


def compile_step(step: nn.Module, max_autotune: bool = True, inductor: bool | None = None,
                 graphs: "GraphSet | None" = None) -> Callable[..., Any]:
    """``step.forward`` through ``torch.compile`` (inductor, static shapes) and, on CUDA, CUDA graphs: a callable
    with its signature.

    ``step`` is a module whose parameters are the weights the step reads (so that ``freezing`` sees them as
    parameters) and whose ``forward`` takes tensors (or lists of tensors) only: Python values it reads are baked
    into the graph unguarded, so keep them fixed (a step per scale, say) rather than pass them in. The first
    call compiles, and so does the first call with a new input shape or dtype; the weights are frozen as they
    are at that call. Compiled CPU kernels keep the thread count of the compile.

    ``inductor``: None = on the CPU only. On CUDA the step is captured into CUDA graphs
    (:mod:`varkit.cuda_graphs`), by default over its eager kernels (a capture takes milliseconds; an inductor
    compile tens of seconds a graph), with ``inductor=True`` over inductor's fused ones. ``graphs``: the
    :class:`~varkit.cuda_graphs.GraphSet` the steps of one generator share (its KV buffers and memory pool); a
    new one when None.
    """
    p = next(step.parameters())
    cuda = p.device.type == "cuda"
    use_inductor = (not cuda) if inductor is None else inductor
    fn = _inductor_step(step, max_autotune) if use_inductor else _own_forward(step)
    if not cuda and graphs is None:  # (a CPU GraphSet(capture=False): the binding without capture, for tests)
        return fn
    from .cuda_graphs import GraphSet

    graphs = graphs if graphs is not None else GraphSet()
    return graphs.wrap(fn, type(step).forward)


def _inductor_step(step: nn.Module, max_autotune: bool) -> Callable[..., Any]:
    """``step.forward`` through ``torch.compile`` under :func:`inductor_settings`."""
    from torch._inductor import config as inductor_config

    p = next(step.parameters())
    # dynamo reads ``freezing`` when it traces and inductor when it compiles, and both happen inside a call
    # (the first one, or one with a new shape): so every call runs under these settings (torch.compile's
    # ``options=`` does not reach dynamo)
    patch = inductor_config.patch(inductor_settings(p.device, p.dtype, max_autotune))
    compiled = torch.compile(_own_forward(step), dynamic=False,
                             options={"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe})

    def run(*args: Any) -> Any:
        # a graph break is an error: the rest of the step would resume in frames dynamo shares between steps, and
        # under tensor-only guards any step could be served another's graphs (it happened: a prepacked Linear's
        # check broke the graph and VAR's scales ran each other's weights). ``fullgraph=True`` would do the same
        # but takes another path that dynamo's frame counters (the tests' recompile checks) do not see
        with patch, torch._dynamo.error_on_graph_break(True):
            return compiled(*args)

    return run
