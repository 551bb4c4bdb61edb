"""Per-row steps (``Generator.forward_rows``): every row at its own layout step, in one batch."""
import pytest
import torch

from varkit.cache import KVCache
from varkit.errors import InvalidArgumentError
from varkit.models import create_model

from conftest import randomize
from numerics import LOGIT_RTOL


def raster():
    return randomize(create_model("raster-tiny"))  # 4x4 grid, 16 steps, vocab 16


def nar():
    return randomize(create_model("nar-tiny"))  # 4x4 grid, 7 fronts of 1,2,3,4,3,2,1, vocab 16


GENS = {"raster": raster, "nar": nar}


def close(got, want):
    # fp32 logits of the tiny models lie within 1e-6 of exact relative to the largest logit (tests/numerics.py);
    # forward_rows attends over the whole masked cache and gathers NAR's head inputs, so its reductions run in
    # other orders than eager forward's: LOGIT_RTOL (1e-5 of the largest logit) holds on any x86-64 CPU
    torch.testing.assert_close(got, want, rtol=0, atol=LOGIT_RTOL * float(want.abs().max()))


def per_row_reference(gen, cond, tokens, step, n):
    """What row ``cond`` (1,) gets from eager forward on a cache of its own: prefill, one step at a time up to
    ``step - 1``, then the complete steps of the ``n`` tokens from step ``step - 1`` in one call."""
    L = gen.layout
    cache = gen.new_cache(1)
    gen.prefill(cond, cache)
    for s in range(1, step):
        gen(tokens[:, L.step_slice(s - 1)], s, cache)
    valid = int(gen.valid_row_outputs(torch.tensor([step]), n))
    k = 0  # the valid outputs are those of steps step … step+k-1, which the tokens of steps step-1 … step+k-2 give
    while L.step_starts[step + k] < L.step_starts[step] + valid:
        k += 1
    out = gen(tokens[:, L.step_slice(step - 1, k)], step, cache)
    return cache, out[:, :valid], valid


def tokens_from(tokens, gen, steps, n):
    """(B, n): row b's tokens from layout index step_starts[steps[b] - 1], padded with token 0."""
    pad = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], n)], 1)
    starts = [gen.layout.step_starts[int(s) - 1] for s in steps]
    return torch.stack([pad[b, a:a + n] for b, a in enumerate(starts)])


@pytest.mark.parametrize("kind,steps,n", [("raster", [1, 6, 15, 16 - 2], 3), ("nar", [1, 3, 5, 6], 4),
                                          ("nar", [2, 4, 4, 6], 7)])
def test_rows_at_different_steps_match_forward_on_their_own_cache(kind, steps, n):
    """Rows prefilled apart and copied in (KVCache.copy_rows), each at its own step: outputs equal eager forward's."""
    gen = GENS[kind]()
    B = len(steps)
    cond = torch.arange(B) % 4
    tokens = torch.randint(0, 16, (B, gen.layout.num_tokens), generator=torch.Generator().manual_seed(3))
    steps = torch.tensor(steps)
    with torch.inference_mode():
        cache = gen.new_cache(B)
        refs = []
        for b in range(B):
            own, want, valid = per_row_reference(gen, cond[b:b + 1], tokens[b:b + 1], int(steps[b]), n)
            cache.copy_rows([b], own)
            refs.append((want, valid))
        got = gen.forward_rows(tokens_from(tokens, gen, steps, n), steps, cache)
    assert got.shape == (B, n, 16) and cache.length == 0  # the caller tracks progress: no length pointer moves
    assert [v for _, v in refs] == gen.valid_row_outputs(steps, n).tolist()
    for b, (want, valid) in enumerate(refs):
        assert valid > 0
        close(got[b:b + 1, :valid], want)


@pytest.mark.parametrize("kind", ["raster", "nar"])
def test_rows_decode_whole_images_with_rejections_and_refeeding(kind):
    """A whole decode through forward_rows alone, rows advancing at their own pace (each keeps a different number
    of its valid outputs, as speculative rejection does) and re-feeding positions they wrote earlier: every kept
    output equals the teacher-forced logits of that token."""
    gen = GENS[kind]()
    L = gen.layout
    B, n = 3, 5
    cond = torch.tensor([0, 1, 3])
    tokens = torch.randint(0, 16, (B, L.num_tokens), generator=torch.Generator().manual_seed(4))
    keep_steps = [1, 2, 100]  # how many valid steps each row keeps per call
    with torch.inference_mode():
        want = gen.teacher_forcing_logits(cond, tokens)
        cache = gen.new_cache(B)
        first, _ = gen.prefill(cond, cache)
        close(first[:, 0], want[:, 0])
        steps = torch.ones(B, dtype=torch.long)
        seen = torch.zeros(B, L.num_tokens, dtype=torch.bool)
        seen[:, 0] = True
        for _ in range(40):
            live = steps < L.num_steps
            if not live.any():
                break
            run = steps.clamp(max=L.num_steps - 1)  # finished rows ride along at their last step
            got = gen.forward_rows(tokens_from(tokens, gen, run, n), run, cache)
            valid = gen.valid_row_outputs(run, n)
            for b in range(B):
                if not live[b]:
                    continue
                a = L.step_starts[int(run[b])]
                close(got[b, :int(valid[b])], want[b, a:a + int(valid[b])])
                v = int(valid[b])  # keep whole steps only: those that end within the valid outputs
                whole = int(L.step_of[a + v - 1]) + (1 if L.step_starts[int(L.step_of[a + v - 1]) + 1] <= a + v else 0)
                last = min(int(run[b]) + keep_steps[b], L.num_steps, whole)
                seen[b, a:L.step_starts[last]] = True
                steps[b] = last
    assert seen.all() and (steps == L.num_steps).all()


def test_padded_captions_stay_hidden_from_rows():
    """Text-to-image with padded captions: prefill's caption mask as the state, outputs equal forward's."""
    gen = randomize(create_model("raster-tiny", caption_dim=8, cls_token_num=3))
    g = torch.Generator().manual_seed(10)
    cond = torch.randn(2, 3, 8, generator=g)
    cond[0, 2] = 0  # row 0's last caption token is padding
    tokens = torch.randint(0, 16, (2, 4), generator=g)
    with torch.inference_mode():
        a, b = gen.new_cache(2), gen.new_cache(2)
        _, mask = gen.prefill(cond, a)
        gen.prefill(cond, b)
        assert mask is not None
        want = gen(tokens, 1, a, mask)
        got = gen.forward_rows(tokens, torch.tensor([1, 1]), b, mask)
        unmasked = gen.forward_rows(tokens, torch.tensor([1, 1]), b)
    close(got, want)
    assert not torch.allclose(unmasked[0], want[0], atol=1e-3)  # the mask matters for row 0


@pytest.mark.parametrize("kind", ["raster", "nar"])
def test_rows_do_not_influence_each_other(kind):
    gen = GENS[kind]()
    B, n = 2, 4
    steps = torch.tensor([3, 2])
    tokens = torch.randint(0, 16, (B, n), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a, b = gen.new_cache(B), gen.new_cache(B)
        gen.prefill(torch.tensor([1, 2]), a)
        gen.prefill(torch.tensor([1, 3]), b)  # row 1: another class, then other tokens
        other = tokens.clone()
        other[1] = (other[1] + 5) % 16
        x, y = gen.forward_rows(tokens, steps, a), gen.forward_rows(other, steps, b)
    # row 0's data and every shape are the same in both calls: the same kernels run the same operations on it,
    # whatever row 1 holds (no op mixes rows), so exact equality holds on any CPU
    assert torch.equal(x[0], y[0]) and not torch.equal(x[1], y[1])
    for la, lb in zip(a.k + a.v, b.k + b.v):
        assert torch.equal(la[0], lb[0])


def test_writes_past_max_len_are_dropped():
    """A row whose inputs run past the cache writes the positions that exist and drops the rest."""
    gen = raster()  # cond_len 1, 16 tokens: max_len 17
    steps = torch.tensor([14, 15, 1])
    tokens = torch.randint(0, 16, (3, 4), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        cache = gen.new_cache(3)
        for t in cache.k + cache.v:
            t.normal_(generator=torch.Generator().manual_seed(7))
        before = [t.clone() for t in cache.k + cache.v]
        gen.forward_rows(tokens, steps, cache)
    for old, new in zip(before, cache.k + cache.v):
        # row 0 writes positions 14..16 (its input 3 falls past 17); row 1 15, 16 (inputs 2, 3 dropped); row 2 1..4
        for row, written in ((0, [14, 15, 16]), (1, [15, 16]), (2, [1, 2, 3, 4])):
            untouched = [p for p in range(17) if p not in written]
            assert torch.equal(new[row, :, untouched], old[row, :, untouched])
            assert not torch.isclose(new[row, :, written], old[row, :, written]).all(-1).any()
    # the last slot holds what the input there wrote, not a dropped write: the same as feeding only what fits
    for row, fit in ((0, 3), (1, 2)):
        with torch.inference_mode():
            fits = KVCache(cache.num_layers, 3, *before[0].shape[1:])
            for t, b in zip(fits.k + fits.v, before):
                t.copy_(b)
            gen.forward_rows(tokens[:, :fit], steps, fits)
        for full, part in zip(cache.k + cache.v, fits.k + fits.v):
            close(full[row, :, 16], part[row, :, 16])


def test_a_row_entirely_past_a_short_cache_writes_nothing():
    gen = nar()
    with torch.inference_mode():
        cache = gen.new_cache(2, max_len=6)  # condition + 5 tokens: fronts 0..2 fit, fronts from 3 do not
        for t in cache.k + cache.v:
            t.normal_(generator=torch.Generator().manual_seed(8))
        before = [t.clone() for t in cache.k + cache.v]
        out = gen.forward_rows(torch.zeros(2, 4, dtype=torch.long), torch.tensor([5, 2]), cache)
    assert torch.isfinite(out).all()
    for old, new in zip(before, cache.k + cache.v):
        assert torch.equal(new[0], old[0])  # front 4 starts at token 10, position 11: past the end
        assert torch.equal(new[1, :, :2], old[1, :, :2]) and not torch.equal(new[1, :, 2:], old[1, :, 2:])


def test_decode_static_is_forward_rows_with_one_step():
    """The compiled raster step (decode_static) is the per-row step with every row at the same step."""
    gen = raster()
    tokens = torch.randint(0, 16, (2, 1), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        a, b = gen.new_cache(2), gen.new_cache(2)
        gen.prefill(torch.tensor([0, 1]), a), gen.prefill(torch.tensor([0, 1]), b)
        x = gen.decode_static(tokens, torch.tensor([a.length]), a.k, a.v)
        y = gen.forward_rows(tokens, torch.tensor([1, 1]), b)
    assert torch.equal(x, y)  # the same function on the same inputs


def test_valid_row_outputs():
    r, q = raster(), nar()
    assert r.valid_row_outputs(torch.tensor([1, 13, 15]), 3).tolist() == [3, 3, 1]
    # NAR fronts 1,2,3,4,3,2,1 start at 0,1,3,6,10,13,15 (16 tokens)
    assert q.valid_row_outputs(torch.tensor([1, 2, 3, 6]), 2).tolist() == [2, 2, 0, 1]  # at most n; 0: front 2 cut
    assert q.valid_row_outputs(torch.tensor([1, 3]), 5).tolist() == [5, 4]


def test_copy_rows_copies_the_filled_prefix():
    src, dst = KVCache(2, 3, 2, 8, 4), KVCache(2, 2, 2, 10, 4)
    for t in src.k + src.v:
        t.normal_()
    src.length = 5
    dst.copy_rows([1, 0], src, [2, 0])
    assert dst.length == 0
    for d, s in zip(dst.k + dst.v, src.k + src.v):
        assert torch.equal(d[1, :, :5], s[2, :, :5]) and torch.equal(d[0, :, :5], s[0, :, :5])
        assert not d[:, :, 5:].any()


@pytest.mark.parametrize("call,match", [
    (lambda g, c: g.forward_rows(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]), c), "steps must lie in 1..15"),
    (lambda g, c: g.forward_rows(torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 16]), c), "steps must lie in 1..15"),
    (lambda g, c: g.forward_rows(torch.zeros(2, dtype=torch.long), torch.tensor([1, 2]), c), "takes tokens"),
    (lambda g, c: g.forward_rows(torch.zeros(3, 2, dtype=torch.long), torch.tensor([1, 2, 3]), c), "takes tokens"),
    (lambda g, c: g.forward_rows(torch.zeros(2, 0, dtype=torch.long), torch.tensor([1, 2]), c), "n >= 1"),
    (lambda g, c: g.forward_rows(torch.zeros(2, 2, dtype=torch.long), torch.tensor([1.0, 2.0]), c), "integer tensor"),
    (lambda g, c: g.forward_rows(torch.zeros(2, 2, dtype=torch.long), [1, 2], c), "integer tensor"),
    (lambda g, c: g.forward_rows(torch.zeros(2, 2, dtype=torch.long), torch.tensor([1, 2]), c, torch.ones(2, 1)),
     "caption mask"),
    (lambda g, c: g.valid_row_outputs(torch.tensor([0, 1]), 3), "steps must lie in 1..15"),
    (lambda g, c: c.copy_rows([0, 1], c, [0]), "2 destination rows for 1 source rows"),
    (lambda g, c: c.copy_rows([2], c, [0]), "outside 0..1"),
    (lambda g, c: c.copy_rows([0], KVCache(1, 1, 2, 17, 16), [0]), "caches of one model"),
])
def test_bad_input_is_one_line(call, match):
    gen = raster()
    with pytest.raises(InvalidArgumentError, match=match) as e:
        call(gen, gen.new_cache(2))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model,kw", [("raster-tiny", {"layout": "neighbors"}), ("var-tiny", {})])
def test_generators_without_rows_say_so(model, kw):
    gen = create_model(model, **kw).eval()
    assert not gen.supports_rows
    with pytest.raises(InvalidArgumentError, match="no per-row steps") as e:
        gen.forward_rows(torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]), gen.new_cache(1))
    assert "\n" not in str(e.value)
