"""The bundled models load offline and make recognisable digits."""
import pytest

import varkit
from varkit.eval.digits import digits_accuracy

BUNDLED = ["digits", "digits-var", "digits-nar"]
# any layout x any head (issue 14): (layout kind, head kind) of each bundled model that combines them
COMBINED = {"digits-maskgit": ("sets", "categorical"), "digits-mar": ("sets", "diffusion"),
            "digits-ar-diffusion": ("raster", "diffusion")}
RECORDED = BUNDLED + ["digits-draft", "digits-mar-draft", *COMBINED]


@pytest.mark.parametrize("name", RECORDED)
def test_bundled_model_is_listed_and_recorded(name):
    assert name in varkit.bundled_models()
    from varkit.pipeline import ASSETS

    for part in ("tokenizer", "generator"):
        cmd = (ASSETS / name / part / "COMMAND.txt").read_text()
        assert cmd.startswith("varkit train ") and "--data digits" in cmd


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_makes_recognisable_digits(name):
    pipe = varkit.load_pipeline(name)
    labels = [c for c in range(10) for _ in range(10)]
    out = pipe(labels, cfg=2.0, seed=0)
    acc = digits_accuracy(out.images, labels)
    assert acc >= 0.8, f"{name}: only {acc:.0%} of cfg=2 samples classified as the requested digit"


# The diffusion head's first respaced step (t=999, alpha_bar 2.4e-9) turns an eps error e into an x0 error of
# ~2e4·e; these small, briefly trained heads are off by e ~ 0.02-0.1 there, so the two bundled diffusion models
# sample with x0_clip=4 (their generator config): the predicted x0 is clamped to the latent range (±2.7).
COMBINED_CASES = list(COMBINED)


@pytest.mark.parametrize("name", COMBINED_CASES)
def test_combined_model_makes_recognisable_digits_at_its_defaults(name):
    """Each layout x head model at the sampling settings stored with it (its CFG, schedule, num_iter,
    head_steps): 30 images, >= 80 % classified as asked (500 images measure >= 99 %: bench/results/quality.json)."""
    pipe = varkit.load_pipeline(name)
    layout, head = COMBINED[name]
    gen = pipe.generator
    assert (gen.layout.kind, gen.head.kind) == (layout, head)
    assert pipe.defaults["cfg"] > 1  # guidance on by default: the accuracy below depends on it
    labels = [c for c in range(10) for _ in range(3)]
    out = pipe(labels, seed=0)
    assert out.tokens.shape == (30, 64, *gen.head.token_shape)
    if layout == "sets":  # num_iter decoding steps, not one per token
        assert out.stats.forward_passes == pipe.defaults["num_iter"] < 64
    acc = digits_accuracy(out.images, labels)
    assert acc >= 0.8, f"{name}: only {acc:.0%} of samples at its defaults classified as the requested digit"


@pytest.mark.parametrize("name", ["digits-mar", "digits-ar-diffusion"])
def test_continuous_model_samples_stay_in_the_latent_range(name):
    """Sampled latents look like the tokenizer's: the digits KL latents (scaled) all lie within ±2.7."""
    pipe = varkit.load_pipeline(name)
    out = pipe([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], seed=0)
    assert float(out.tokens.abs().max()) < 10.0, f"{name}: latents up to {float(out.tokens.abs().max()):.3g}"


def test_default_model_generates_from_the_cli(tmp_path):
    from varkit.cli import main

    assert main(["generate", "--model", "digits", "--classes", "0", "1", "2", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_bench_quality_writes_a_table_and_json(tmp_path, capsys):
    import json

    from varkit.cli import main

    assert main(["bench", "quality", "--models", "digits", "--per-class", "2", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert rows[0]["model"] == "digits" and rows[0]["images"] == 20 and rows[0]["forward_passes"] == 64
    assert rows[0]["floor_passes"] == 64 and rows[0]["floor_s"] > 0  # one batch of 20: 64 passes, replayed
    assert rows[0]["fraction_of_floor"] == pytest.approx(rows[0]["floor_s"] / rows[0][rows[0]["fraction_of_floor_basis"]], rel=1e-12)
    assert "digits_fid" in capsys.readouterr().out


def test_bundled_drafter_is_close_to_its_target():
    """The distilled digits-draft proposes what digits would sample: mean per-position TV (CFG 2) well
    under the 0.43 of the drafter trained on data alone; the target against itself is at 0."""
    import torch

    from varkit.bench.speculative import draft_tv
    from varkit.samplers import SamplingParams, get_sampler
    from varkit.samplers.logits import image_generators

    target, draft = varkit.load_pipeline("digits").generator, varkit.load_pipeline("digits-draft").generator
    params = SamplingParams(cfg=2.0)
    labels = torch.arange(100) % 10
    tokens = get_sampler("ancestral", params).sample(target, labels, image_generators(11, 100)).tokens
    # the same model twice on the same inputs: identical fp32 numbers on any CPU (TV 0); 1e-5 is only a
    # guard against a reduction that is not run-to-run deterministic (a few ulp of probabilities <= 1)
    assert float(draft_tv(target, target, params, labels, tokens).max()) < 1e-5
    tv = float(draft_tv(target, draft, params, labels, tokens).mean())
    assert tv < 0.35, f"digits-draft is at TV {tv:.3f} from digits"
    c = draft.config
    assert c.n_layer * c.dim <= target.config.n_layer * target.config.dim / 2  # at most half the target's layers x width


def test_speculative_bench_rows_say_whether_the_target_is_met():
    from varkit.bench.speculative import rows_for

    res = {"ancestral": {"target_passes": 64.0, "accuracy": 0.94},
           "fast": {"target_passes": 21.0, "accuracy": 0.90},
           "too slow": {"target_passes": 22.0, "accuracy": 0.94},
           "too lossy": {"target_passes": 16.0, "accuracy": 0.88}}
    met = {r["method"]: r["met"] for r in rows_for("digits", res)}
    assert met == {"ancestral": "", "fast": "yes", "too slow": "no", "too lossy": "no"}


def test_bench_speculative_rows_carry_floors(tmp_path):
    """Every timed row of ``varkit bench speculative`` has the floor of its own calls: the target's and the
    drafter's passes, replayed with the same draws (so as many as the timed run made)."""
    import json

    from varkit.cli import main

    assert main(["bench", "speculative", "--skip-large", "--images", "2", "--deltas", "--gamma", "4",
                 "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "speculative.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert {"ancestral", "sjd", "speculative"} <= set(rows)
    for r in rows.values():
        assert r["floor_passes"] == r["images"] * (r["target_passes"] + r["draft_passes"]), r
        assert r["floor_s"] > 0 and r["fraction_of_floor"] == pytest.approx(r["floor_s"] / r[r["fraction_of_floor_basis"]], rel=1e-12)
    assert rows["speculative"]["draft_passes"] > 0 and data["floor"]["peak_gemm_flops"]
