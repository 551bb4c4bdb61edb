"""SJD: exactly lossless (χ² against the enumerated joint), deterministic invariants, errors."""
import pytest
import torch
from conftest import randomize
from stats_helpers import CFG, CFG_LINEAR, N_SAMPLES, NOCFG, gof_pvalue, seeded_generators

from varkit.errors import InvalidArgumentError
from varkit.layout import build_layout, neighbors
from varkit.models.base import Generator
from varkit.samplers import SAMPLERS, SamplingParams, get_sampler
from varkit.samplers.logits import image_generators
from varkit.samplers.sjd import SJDSampler, draft_sources, window_ends


def test_registry():
    assert SAMPLERS.get("sjd") is SJDSampler and SJDSampler.lossless


def sample_sjd(gen, params, window, init, seed, n=N_SAMPLES, rule=None):
    labels = torch.arange(n) % gen.num_classes
    smp = SJDSampler(params, window=window, init=init)
    if rule is not None:
        smp._rule = rule
    return smp.sample(gen, labels, seeded_generators(seed, n)), labels


# windows 1, 2, 4 (4 = the whole sequence) each with and without CFG, both inits, plus one of each extra
LOSSLESS = [
    (1, "random", NOCFG), (2, "repeat_horizon", NOCFG), (4, "random", NOCFG),
    (1, "repeat_horizon", CFG), (2, "random", CFG), (4, "repeat_horizon", CFG), (4, "random", CFG),
    (3, "sample_horizon", CFG_LINEAR),
]
# maximal coupling of the tail redraws (MC-SJD): exact too
COUPLED = [(2, "random", NOCFG), (4, "repeat_horizon", CFG)]


@pytest.mark.parametrize("k", range(len(LOSSLESS)),
                         ids=[f"w{w}-{i}-cfg{p.cfg}" for w, i, p in LOSSLESS])
def test_sjd_reproduces_the_exact_joint(toy, k):
    window, init, params = LOSSLESS[k]
    res, labels = sample_sjd(toy, params, window, init, seed=100 + k)
    pv = gof_pvalue(toy, res.tokens, labels, params)
    assert pv > 0.01
    assert sum(res.stats.accepted_per_pass) == pytest.approx(toy.layout.num_tokens)  # integer counts: exact


@pytest.mark.parametrize("k", range(len(COUPLED)), ids=[f"w{w}-{i}-cfg{p.cfg}" for w, i, p in COUPLED])
def test_coupled_sjd_reproduces_the_exact_joint(toy, k):
    window, init, params = COUPLED[k]
    labels = torch.arange(N_SAMPLES) % 2
    smp = SJDSampler(params, window=window, init=init, coupling=True)
    res = smp.sample(toy, labels, seeded_generators(200 + k, N_SAMPLES))
    assert gof_pvalue(toy, res.tokens, labels, params) > 0.01


@pytest.mark.parametrize("rule", [
    lambda p_x, q_x: torch.ones_like(p_x),  # always accept
    lambda p_x, q_x: (p_x / q_x).clamp(max=1).sqrt(),  # accepts too often
], ids=["always", "sqrt"])
def test_the_same_test_rejects_a_wrong_acceptance_rule(toy, rule):
    res, labels = sample_sjd(toy, NOCFG, 4, "repeat_horizon", seed=3, rule=rule)
    assert gof_pvalue(toy, res.tokens, labels, NOCFG) < 1e-6  # statistical (a wrong law is rejected), not a numeric tolerance


# -- a multi-token-step layout: verification per step (NAR's neighbors fronts) ------------------------
class FrontTable(Generator):
    """An explicit model on the neighbors layout: the logits of a token are a class bias plus a
    sum of pair terms over the tokens of earlier fronts; tokens of one front are independent."""

    supports_multistep = True
    supports_rollback = True

    def __init__(self, grid=2, vocab=3, classes=2, seed=0):
        super().__init__(None)
        g = torch.Generator().manual_seed(seed)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # device and dtype for the KVCache
        self.layout = neighbors(grid)
        self.vocab_size, self.num_classes = vocab, classes
        T = self.layout.num_tokens
        self.bias = torch.randn(classes + 1, T, vocab, generator=g) * 1.5
        self.pair = torch.randn(T, T, vocab, vocab, generator=g) * 1.5
        before = self.layout.step_of[None, :] < self.layout.step_of[:, None]  # [i, j]: j in an earlier front
        self.pair *= before[..., None, None]

    cond_len = 1

    def null_condition(self, cond):
        return torch.full_like(cond, self.num_classes)

    def cache_dims(self):
        return 1, 1, 1

    def max_cache_len(self):
        return 1 + self.layout.num_tokens

    def table_logits(self, cond, tokens):
        """Logits (B, T, V) of every token given ``tokens`` (only earlier fronts are read)."""
        onehot = torch.nn.functional.one_hot(tokens, self.vocab_size).float()  # (B, T, V)
        return self.bias[cond] + torch.einsum("bja,ijac->bic", onehot, self.pair)

    def prefill(self, cond, cache):
        cache.advance(1)
        state = {"cond": cond, "tokens": torch.zeros(cond.shape[0], self.layout.num_tokens, dtype=torch.long)}
        return self.bias[cond][:, :1], state

    def forward(self, tokens, step, cache, state=None):
        starts = self.layout.step_starts
        assert cache.length == 1 + starts[step - 1]
        k = self.num_steps_in(tokens.shape[1], step)
        state["tokens"][:, starts[step - 1]:starts[step - 1] + tokens.shape[1]] = tokens
        cache.advance(tokens.shape[1])
        logits = self.table_logits(state["cond"], state["tokens"])
        return logits[:, starts[step]:starts[min(step + k, self.layout.num_steps)]]

    def rollback(self, cache, state, step):
        cache.truncate(1 + self.layout.step_starts[step - 1])

    def teacher_forcing_logits(self, cond, tokens):
        return self.table_logits(cond, tokens)


@pytest.mark.parametrize("window, params", [(2, NOCFG), (3, CFG), (4, NOCFG)])
def test_per_step_verification_on_fronts(window, params):
    gen = FrontTable()
    res, labels = sample_sjd(gen, params, window, "repeat_horizon", seed=window)
    assert gof_pvalue(gen, res.tokens, labels, params) > 0.01
    assert res.stats.forward_passes <= gen.layout.num_steps  # every pass commits at least one whole front


def test_front_table_rejects_a_wrong_rule():
    gen = FrontTable()
    res, labels = sample_sjd(gen, NOCFG, 4, "random", seed=1, rule=lambda p_x, q_x: torch.ones_like(p_x))
    assert gof_pvalue(gen, res.tokens, labels, NOCFG) < 1e-6  # statistical (a wrong law is rejected), not a numeric tolerance


def test_nar_generator():
    """The real NAR generator (fronts of the neighbors layout): exact, and greedy = ancestral."""
    from varkit.models.neighbors import NeighborsConfig, NeighborsGenerator

    small = {"multiple_of": 16, "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0, "n_head": 2}
    gen = randomize(NeighborsGenerator(NeighborsConfig(vocab_size=4, num_classes=2, dim=16, n_layer=1, grid=2,
                                                       **small)), std=1.0, seed=1)
    res, labels = sample_sjd(gen, CFG, 3, "repeat_horizon", seed=7)
    assert gof_pvalue(gen, res.tokens, labels, CFG) > 0.01
    big = randomize(NeighborsGenerator(NeighborsConfig(vocab_size=16, num_classes=4, dim=32, n_layer=2, grid=4,
                                                       **small)))
    params = SamplingParams(cfg=3.0, top_k=1)
    ref = get_sampler("ancestral", params).sample(big, torch.tensor([0, 1, 2, 3]), image_generators(0, 4))
    out = SJDSampler(params, window=5).sample(big, torch.tensor([0, 1, 2, 3]), image_generators(0, 4))
    assert torch.equal(out.tokens, ref.tokens) and out.stats.forward_passes <= big.layout.num_steps


def test_spatial_init_sources():
    """raster 3×3, positions >= 4 new: copy the nearest old left neighbour, else column 0's random draw."""
    src = draft_sources(build_layout("raster", (3, 3)), pad=2)
    assert src.shape == (10, 11)
    assert src[4, 4:9].tolist() == [3, 3, -7, -7, -7]
    assert src[0, 3:6].tolist() == [-4, -4, -4]
    assert src[5, 5] == 4 and src[8, 8] == 7
    nb = draft_sources(neighbors(3), pad=0)  # fronts (0,0) | (0,1) (1,0) | (0,2) (1,1) (2,0) | ...
    assert nb[3, 3:6].tolist() == [1, 2, -6]  # (0,2) ← (0,1); (1,1) ← (1,0); (2,0) random


def test_window_ends_use_whole_steps():
    starts = neighbors(3).step_starts  # fronts of 1, 2, 3, 2, 1 tokens
    assert window_ends(starts, 2) == [1, 2, 3, 4, 5]
    assert window_ends(starts, 5) == [1, 3, 4, 5, 5]
    assert window_ends(build_layout("raster", (2, 2)).step_starts, 2) == [1, 3, 4, 4]


# -- deterministic invariants ----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("window, init", [(1, "random"), (3, "repeat_horizon"), (16, "random"), (7, "sample_horizon")])
def test_top_k_1_equals_greedy_ancestral(tiny_gen, cfg, window, init):
    params = SamplingParams(cfg=cfg, top_k=1)
    labels = torch.tensor([0, 1, 2, 3])
    ref = get_sampler("ancestral", params).sample(tiny_gen, labels, image_generators(0, 4))
    res = SJDSampler(params, window=window, init=init).sample(tiny_gen, labels, image_generators(0, 4))
    assert torch.equal(res.tokens, ref.tokens)


def test_window_1_costs_one_pass_per_token(tiny_gen):
    res = SJDSampler(SamplingParams(cfg=2.0), window=1).sample(tiny_gen, torch.tensor([0, 1]), image_generators(0, 2))
    assert res.stats.forward_passes == 16 and res.stats.accepted_per_pass == [1.0] * 16
    assert res.stats.steps == 16 and res.stats.tokens == 32


def test_context_free_model_converges_in_three_passes(tiny_gen):
    """Tokens that ignore the context: the Jacobi tail drafts from the exact p, so q = p and the
    second real pass accepts everything (acceptance 1 when q = p)."""
    with torch.no_grad():
        tiny_gen.tok_embeddings.weight.zero_()
    params = SamplingParams(cfg=2.0, temperature=1.3)
    smp = SJDSampler(params, window=16, init="random")
    res = smp.sample(tiny_gen, torch.tensor([0, 1, 2, 3]), image_generators(0, 4))
    assert res.stats.forward_passes <= 3
    assert sum(res.stats.accepted_per_pass) == pytest.approx(16)  # integer counts: exact
    assert res.stats.mean_accepted == pytest.approx(16 / res.stats.forward_passes)  # the same ratio of integers
    assert (smp.trace["accepted"].sum(0) == 16).all() and (smp.trace["start"][0] == 0).all()


def test_same_seed_same_image_whatever_batch(tiny_gen):
    params = SamplingParams(cfg=2.0, temperature=0.7)
    labels = [3, 1, 0, 2, 1, 3, 0, 2]
    full = SJDSampler(params, window=5).sample(tiny_gen, torch.tensor(labels), image_generators(7, 8)).tokens
    for i in (0, 5):
        one = SJDSampler(params, window=5).sample(tiny_gen, torch.tensor([labels[i]]), [image_generators(7, 8)[i]])
        assert torch.equal(one.tokens[0], full[i])
    g = image_generators(7, 8)
    moved = SJDSampler(params, window=5).sample(tiny_gen, torch.tensor([labels[5], labels[0]]), [g[5], g[0]]).tokens
    assert torch.equal(moved[0], full[5]) and torch.equal(moved[1], full[0])


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"window": 0}, "window"), ({"window": -2}, "window"), ({"window": 2.5}, "window"),
    ({"init": "vertical"}, "init"), ({"coupling": "yes"}, "coupling"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        get_sampler("sjd", SamplingParams(), **kwargs)


def test_window_longer_than_sequence(tiny_gen):
    with pytest.raises(InvalidArgumentError, match="longer than the 16-token"):
        SJDSampler(window=17).sample(tiny_gen, torch.tensor([0]), image_generators(0, 1))


def test_refuses_generators_it_cannot_drive(tiny_gen):
    tiny_gen.supports_rollback = False
    with pytest.raises(InvalidArgumentError, match="roll"):
        SJDSampler(window=4).sample(tiny_gen, torch.tensor([0]), image_generators(0, 1))
    tiny_gen.supports_rollback = True
    tiny_gen.layout = build_layout("scales", patch_nums=[1, 2, 3])
    with pytest.raises(InvalidArgumentError, match="scales layout"):
        SJDSampler(window=4).sample(tiny_gen, torch.tensor([0]), image_generators(0, 1))


# -- pipeline and CLI -----------------------------------------------------------------------------------
def test_pipeline_and_cli(tiny_pipeline, tmp_path, capsys):
    from varkit.cli import main

    out = tiny_pipeline([0, 1, 2], sampler="sjd", window=6, cfg=2.0, seed=1)
    assert len(out.images) == 3 and out.stats.forward_passes <= 16
    assert sum(out.stats.accepted_per_pass) == pytest.approx(16)  # integer counts: exact
    greedy = tiny_pipeline([0, 1, 2], sampler="sjd", window=6, top_k=1, seed=1)
    assert torch.equal(greedy.tokens, tiny_pipeline([0, 1, 2], top_k=1, seed=1).tokens)
    tiny_pipeline.save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--classes", "0", "1", "--sampler", "sjd",
                 "--window", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["generate", "--model", str(tmp_path / "m"), "--sampler", "sjd", "--window", "0",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "window" in capsys.readouterr().err


def test_bench_sjd_cli(tiny_pipeline, tmp_path, capsys):
    import argparse
    import json

    from varkit.bench.sjd import add_sjd_bench_parser

    tiny_pipeline.save_pretrained(tmp_path / "m")
    parser = argparse.ArgumentParser()
    add_sjd_bench_parser(parser.add_subparsers(dest="bench"))
    args = parser.parse_args(["sjd", "--bundled", str(tmp_path / "m"), "--skip-large", "--batch", "1", "2", "--coupling",
                              "--images", "2", "--windows", "3", "16", "--out-dir", str(tmp_path / "r")])
    args.func(args)
    data = json.loads((tmp_path / "r" / "sjd.json").read_text())
    assert {r["sampler"] for r in data["rows"]} == {"ancestral", "sjd w3", "sjd w16", "sjd w3 mc", "sjd w16 mc"}
    anc = [r for r in data["rows"] if r["sampler"] == "ancestral"]
    assert all(r["passes"] == 16 and r["accepted_per_pass"] == 1 for r in anc)
    for r in data["rows"]:  # the floor counts the work of the timed calls, replayed with the same draws
        assert r["floor_passes"] == r["passes"] * r["images"] / r["batch"], r
        assert r["floor_s"] > 0 and r["fraction_of_floor"] == pytest.approx(r["floor_s"] / r[r["fraction_of_floor_basis"]], rel=1e-12)
    assert data["floor"]["peak_gemm_flops"]
    cont = json.loads((tmp_path / "r" / "sjd-continuous.json").read_text())["rows"]
    assert [r["mode"] for r in cont] == ["alone", "lockstep", "continuous"]
    for r in cont:  # continuous batching rows: the floor of the row's own calls too
        assert r["floor_passes"] == r["calls"] and r["floor_s"] > 0
        assert r["fraction_of_floor"] == pytest.approx(r["floor_s"] / r[r["fraction_of_floor_basis"]], rel=1e-12)
    assert (tmp_path / "r" / "sjd_accepted.png").stat().st_size > 0
    assert "sjd w16" in capsys.readouterr().out
