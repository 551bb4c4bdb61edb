"""Draft-model speculative decoding: exactly lossless (χ² against the enumerated joint),
deterministic invariants, ragged batches, errors, pipeline and CLI."""
import pytest
import torch
from conftest import randomize, toy_model
from stats_helpers import CFG, CFG_LINEAR, N_SAMPLES, NOCFG, gof_pvalue, seeded_generators

from varkit.errors import InvalidArgumentError, ModelNotFoundError
from varkit.models import create_model
from varkit.pipeline import Pipeline
from varkit.samplers import SAMPLERS, SamplingParams, get_sampler
from varkit.samplers.logits import image_generators
from varkit.samplers.speculative import SpeculativeSampler
from varkit.tokenizers import VQConfig, VQTokenizer


@pytest.fixture(autouse=True)
def _registered(request, monkeypatch):
    """Until the registry line lands, register the sampler for these tests (test_registry checks the real one)."""
    if request.node.name != "test_registry":
        monkeypatch.setitem(SAMPLERS, "speculative", SpeculativeSampler)


def test_registry():
    assert SAMPLERS.get("speculative") is SpeculativeSampler and SpeculativeSampler.lossless


@pytest.fixture(scope="module")
def drafts():
    """A bad drafter (another random model), a uniform one (all-zero weights), and a sharp,
    confidently wrong one."""
    uniform = toy_model(0, std=0.0)
    return {"bad": toy_model(7), "uniform": uniform, "sharp": toy_model(11, std=3.0)}


def sample_spec(gen, draft, params, gamma, seed, n=N_SAMPLES, rule=None, **kw):
    labels = torch.arange(n) % gen.num_classes
    smp = SpeculativeSampler(params, draft=draft, gamma=gamma, **kw)
    if rule is not None:
        smp._rule = rule
    return smp.sample(gen, labels, seeded_generators(seed, n)), labels, smp


# (gamma, params, draft): several γ (1 … beyond the sequence), with and without CFG, three bad drafters
LOSSLESS = [
    (1, NOCFG, "bad"), (2, CFG, "bad"), (3, CFG, "uniform"), (4, CFG_LINEAR, "sharp"), (8, NOCFG, "sharp"),
    (2, CFG, "sharp"),
]


@pytest.mark.parametrize("k", range(len(LOSSLESS)), ids=[f"g{g}-cfg{p.cfg}-{d}" for g, p, d in LOSSLESS])
def test_speculative_reproduces_the_exact_joint(toy, drafts, k):
    gamma, params, which = LOSSLESS[k]
    res, labels, smp = sample_spec(toy, drafts[which], params, gamma, seed=100 + k)
    assert gof_pvalue(toy, res.tokens, labels, params) > 0.01
    assert sum(res.stats.accepted_per_pass) == pytest.approx(toy.layout.num_tokens)  # integer counts: exact
    assert res.stats.forward_passes <= toy.layout.num_tokens
    assert smp.trace["draft_passes"] >= res.stats.forward_passes


@pytest.mark.parametrize("rule", [
    lambda p_x, q_x: torch.ones_like(p_x),  # always accept
    lambda p_x, q_x: (p_x / q_x).clamp(max=1).sqrt(),  # accepts too often
], ids=["always", "sqrt"])
def test_the_same_test_rejects_a_wrong_acceptance_rule(toy, drafts, rule):
    res, labels, _ = sample_spec(toy, drafts["bad"], NOCFG, 3, seed=3, rule=rule)
    assert gof_pvalue(toy, res.tokens, labels, NOCFG) < 1e-6  # statistical (a wrong law is rejected), not a numeric tolerance


# -- deterministic invariants ----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("gamma", [1, 3, 20])
def test_top_k_1_equals_greedy_ancestral(tiny_gen, cfg, gamma):
    params = SamplingParams(cfg=cfg, top_k=1)
    labels = torch.tensor([0, 1, 2, 3])
    draft = randomize(create_model("raster-tiny", dim=16, n_layer=1), seed=5)
    ref = get_sampler("ancestral", params).sample(tiny_gen, labels, image_generators(0, 4))
    res = SpeculativeSampler(params, draft=draft, gamma=gamma).sample(tiny_gen, labels, image_generators(0, 4))
    assert torch.equal(res.tokens, ref.tokens)


@pytest.mark.parametrize("gamma", [1, 4, 15])
def test_the_target_as_its_own_drafter_accepts_everything(tiny_gen, gamma):
    """q = p: every draft is accepted, each pass commits gamma + 1 tokens (the bonus included)."""
    smp = SpeculativeSampler(SamplingParams(cfg=2.0, temperature=1.3), draft=tiny_gen, gamma=gamma)
    res = smp.sample(tiny_gen, torch.tensor([0, 1, 2]), image_generators(0, 3))
    T = tiny_gen.layout.num_tokens
    assert res.stats.forward_passes == 1 + -(-(T - 1) // (gamma + 1))
    assert res.stats.accepted_per_pass[:2] == [1.0, float(min(gamma + 1, T - 1))]
    assert res.stats.mean_accepted == pytest.approx(T / res.stats.forward_passes)  # the same ratio of integers
    assert (smp.trace["accepted"].sum(0) == T).all()


def test_same_seed_same_image_whatever_batch(tiny_gen):
    params = SamplingParams(cfg=2.0, temperature=0.7)
    draft = randomize(create_model("raster-tiny", dim=16, n_layer=1), seed=5)
    labels = [3, 1, 0, 2, 1, 3, 0, 2]
    smp = SpeculativeSampler(params, draft=draft, gamma=3)
    full = smp.sample(tiny_gen, torch.tensor(labels), image_generators(7, 8)).tokens
    assert (smp.trace["accepted"].sum(0) == 16).all()
    for i in (0, 5):
        one = smp.sample(tiny_gen, torch.tensor([labels[i]]), [image_generators(7, 8)[i]])
        assert torch.equal(one.tokens[0], full[i])
    g = image_generators(7, 8)
    moved = smp.sample(tiny_gen, torch.tensor([labels[5], labels[0]]), [g[5], g[0]]).tokens
    assert torch.equal(moved[0], full[5]) and torch.equal(moved[1], full[0])


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0, -1, 2.5, True, "4"])
def test_bad_gamma(tiny_gen, gamma):
    with pytest.raises(InvalidArgumentError, match="gamma"):
        get_sampler("speculative", SamplingParams(), draft=tiny_gen, gamma=gamma)


def test_draft_is_required_and_must_exist():
    with pytest.raises(InvalidArgumentError, match="draft model"):
        get_sampler("speculative", SamplingParams())
    with pytest.raises(ModelNotFoundError, match="unknown draft model"):
        get_sampler("speculative", SamplingParams(), draft="no-such-drafter")
    with pytest.raises(InvalidArgumentError, match="draft must be"):
        get_sampler("speculative", SamplingParams(), draft=3)


@pytest.mark.parametrize("kw, match", [
    ({"vocab_size": 32}, "different vocabularies"),
    ({"grid": 2}, "different layouts"),
    ({"layout": "neighbors"}, "different layouts"),
    ({"num_classes": 7}, "different conditions"),
])
def test_mismatched_drafter(tiny_gen, kw, match):
    draft = create_model("raster-tiny", **kw)
    with pytest.raises(InvalidArgumentError, match=match):
        SpeculativeSampler(draft=draft).sample(tiny_gen, torch.tensor([0]), image_generators(0, 1))


def test_refuses_generators_it_cannot_drive(tiny_gen):
    draft = create_model("raster-tiny")
    for who in (tiny_gen, draft):
        who.supports_rollback = False
        with pytest.raises(InvalidArgumentError, match="roll back"):
            SpeculativeSampler(draft=draft).sample(tiny_gen, torch.tensor([0]), image_generators(0, 1))
        who.supports_rollback = True
    nb = create_model("raster-tiny", layout="neighbors")
    with pytest.raises(InvalidArgumentError, match="multi-token steps"):
        SpeculativeSampler(draft=nb).sample(nb, torch.tensor([0]), image_generators(0, 1))


def _tokenizer(seed):
    torch.manual_seed(seed)
    return VQTokenizer(VQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                                codebook_dim=4, norm_groups=4)).eval()


def test_different_tokenizers(tiny_pipeline, tmp_path):
    draft_gen = randomize(create_model("raster-tiny", dim=16, n_layer=1), seed=5)
    other = Pipeline(_tokenizer(1), draft_gen, name="other")
    smp = SpeculativeSampler(draft=other)
    smp.bind_tokenizer(tiny_pipeline.tokenizer)
    with pytest.raises(InvalidArgumentError, match="different tokenizers"):
        smp.sample(tiny_pipeline.generator, torch.tensor([0]), image_generators(0, 1))
    # the same tokenizer, the drafter given as a saved pipeline folder: fine
    Pipeline(tiny_pipeline.tokenizer, draft_gen, name="d").save_pretrained(tmp_path / "d")
    smp = SpeculativeSampler(draft=str(tmp_path / "d"))
    smp.bind_tokenizer(tiny_pipeline.tokenizer)
    assert smp.sample(tiny_pipeline.generator, torch.tensor([0, 1]), image_generators(0, 2)).tokens.shape == (2, 16)


# -- pipeline and CLI -----------------------------------------------------------------------------------
def test_pipeline_and_cli(tiny_pipeline, tmp_path, capsys):
    from varkit.cli import main

    draft_gen = randomize(create_model("raster-tiny", dim=16, n_layer=1), seed=5)
    out = tiny_pipeline([0, 1, 2], sampler="speculative", draft=draft_gen, gamma=3, cfg=2.0, seed=1)
    assert len(out.images) == 3 and out.stats.forward_passes <= 16
    assert sum(out.stats.accepted_per_pass) == pytest.approx(16)  # integer counts: exact
    greedy = tiny_pipeline([0, 1, 2], sampler="speculative", draft=draft_gen, top_k=1, seed=1)
    assert torch.equal(greedy.tokens, tiny_pipeline([0, 1, 2], top_k=1, seed=1).tokens)
    tiny_pipeline.save_pretrained(tmp_path / "m")
    draft_gen.save_pretrained(tmp_path / "dgen")  # a bare generator folder works as a drafter too
    assert main(["generate", "--model", str(tmp_path / "m"), "--classes", "0", "1", "--sampler", "speculative",
                 "--option", f"draft={tmp_path / 'dgen'}", "--option", "gamma=2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["generate", "--model", str(tmp_path / "m"), "--sampler", "speculative", "--option",
                 f"draft={tmp_path / 'dgen'}", "--option", "gamma=0", "--out", str(tmp_path / "x.png")]) == 2
    assert "gamma" in capsys.readouterr().err
