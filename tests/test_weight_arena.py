"""Gathering the kernels' weight copies end to end into one buffer of huge pages (varkit/nn/weight_arena.py): the
copies are moved, not recomputed, in the order they were made; outputs stay bit-identical; edits and ``.to()`` are
seen; ``VARKIT_WEIGHT_ARENA=0`` leaves them alone."""
import mmap
import sys

import pytest
import torch
import torch.nn.functional as F

from varkit.nn import weight_arena
from varkit.nn.layers import Linear, packable_dtypes, prepack_linears, weight_key
from varkit.nn.stream_gemv import block_weight, panel_dtypes, stream_kernel

needs_kernel = pytest.mark.skipif(stream_kernel() is None, reason="no C++ toolchain to build the kernel here")


@pytest.fixture(autouse=True)
def _gathering_on(monkeypatch):
    monkeypatch.setenv("VARKIT_WEIGHT_ARENA", "1")


def _flush() -> None:
    """Gather (or drop) copies other tests left pending, so that each test sees only its own."""
    for kind in ("_blocked", "_panels"):
        weight_arena.gather(kind, lambda m: weight_key(m.weight))


def _model(dtype=torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(128, 96), Linear(96, 160, bias=False), Linear(160, 64)).eval().to(dtype)
    prepack_linears(model)
    return model


def _storages(model: torch.nn.Module, kind: str) -> list[int]:
    return [m.__dict__[kind][1].untyped_storage().data_ptr() for m in model]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                    reason="transparent huge pages are a Linux feature")
def test_large_buffers_start_on_a_huge_page_and_small_ones_come_from_torch():
    big = weight_arena.huge_buffer(3 * weight_arena.HUGE_PAGE_BYTES + 100)
    assert big.dtype == torch.uint8 and big.numel() == 3 * weight_arena.HUGE_PAGE_BYTES + 100
    assert big.data_ptr() % weight_arena.HUGE_PAGE_BYTES == 0
    big.fill_(7)  # writable, whole
    assert int(big[-1]) == 7
    small = weight_arena.huge_buffer(1000)
    assert small.numel() == 1000


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,kind", [(2, "_blocked"), (5, "_panels")])
def test_copies_are_moved_into_one_buffer_in_the_order_made_with_the_same_outputs(dtype, rows, kind):
    if dtype not in packable_dtypes() or (kind == "_panels" and dtype not in panel_dtypes()):
        pytest.skip(f"{dtype} weights take neither kernel on this CPU (oneDNN's own paths)")
    _flush()
    model = _model(dtype)
    x = torch.randn(rows, 128).to(dtype)
    with torch.inference_mode():
        before = model(x)  # makes each linear's copy: pending
        made = [m.__dict__[kind][1].clone() for m in model]
        assert len(set(_storages(model, kind))) == 3
        again = model(x)  # the first linear asks again: all three move
    assert weight_arena.is_pending(model[0], kind) is False
    starts = _storages(model, kind)
    assert len(set(starts)) == 1  # one buffer
    offsets = [m.__dict__[kind][1].data_ptr() for m in model]
    assert offsets == sorted(offsets) and all(o % weight_arena.COPY_ALIGN == 0 for o in offsets)
    for m, old in zip(model, made):
        assert torch.equal(m.__dict__[kind][1], old)
    assert torch.equal(again, before)  # moved, not recomputed: bit for bit
    with torch.inference_mode():
        assert torch.equal(model(x), before)


@needs_kernel
def test_a_weight_edited_before_the_move_keeps_a_fresh_copy_of_its_own():
    _flush()
    model = _model()
    x = torch.randn(2, 128)
    with torch.inference_mode():
        model(x)
    with torch.no_grad():
        model[1].weight.mul_(2)  # its pending copy is stale now
    with torch.inference_mode():
        out = model(x)
        want = F.linear(F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight), model[2].weight,
                        model[2].bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    starts = _storages(model, "_blocked")
    assert starts[0] == starts[2] != starts[1]  # the two unchanged copies moved together, the edited one apart
    assert torch.equal(model[1].__dict__["_blocked"][1], block_weight(model[1].weight))


@needs_kernel
def test_moving_the_model_drops_the_gathered_copies_and_the_switch_keeps_them_apart(monkeypatch):
    _flush()
    model = _model()
    x = torch.randn(2, 128)
    with torch.inference_mode():
        model(x)
        model(x)
    assert len(set(_storages(model, "_blocked"))) == 1
    model.to(torch.float64).to(torch.float32)  # stale copies dropped
    assert all("_blocked" not in m.__dict__ for m in model)
    monkeypatch.setenv("VARKIT_WEIGHT_ARENA", "0")
    with torch.inference_mode():
        model(x)
        model(x)
    assert len(set(_storages(model, "_blocked"))) == 3
    assert not any(weight_arena.is_pending(m, "_blocked") for m in model)


@needs_kernel
def test_the_fused_front_layers_plans_pick_up_the_moved_panel_copies():
    """NAR's fused front layers keep their linears' panel copies in a plan; after the move the plan holds the moved
    copies (the separate ones are freed), and the tokens stay the same."""
    from varkit.models import create_model
    from varkit.samplers import SamplingParams, get_sampler
    from varkit.samplers.logits import image_generators

    _flush()
    torch.manual_seed(0)
    gen = create_model("nar-tiny").eval()
    prepack_linears(gen)
    sampler = get_sampler("ancestral", SamplingParams(cfg=2.0))
    with torch.inference_mode():
        first = sampler.sample(gen, torch.tensor([1]), image_generators(0, 1))
        second = sampler.sample(gen, torch.tensor([1]), image_generators(0, 1))
    first, second = (getattr(r, "tokens", r) for r in (first, second))
    assert torch.equal(first, second)
    linears = [m for m in gen.modules() if isinstance(m, Linear) and "_panels" in m.__dict__]
    assert linears and len({m.__dict__["_panels"][1].untyped_storage().data_ptr() for m in linears}) == 1
    plans = [b.__dict__["_front_plan"][1] for b in gen.modules() if "_front_plan" in b.__dict__]
    assert plans and all(p is not None for p in plans)
    moved = {m.__dict__["_panels"][1].data_ptr() for m in linears}
    assert all(t.data_ptr() in moved for p in plans for t in p)


@needs_kernel
def test_without_memory_for_the_buffer_the_copies_stay_where_they_are(monkeypatch):
    _flush()
    model = _model()
    x = torch.randn(2, 128)

    def no_memory(nbytes):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(weight_arena, "huge_buffer", no_memory)
    with torch.inference_mode():
        before = model(x)
        assert torch.equal(model(x), before)  # the move failed quietly; decoding goes on
    assert len(set(_storages(model, "_blocked"))) == 3
    assert not any(weight_arena.is_pending(m, "_blocked") for m in model)
