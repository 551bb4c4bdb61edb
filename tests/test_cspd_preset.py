"""The bundled digits-mar folder's ``cspd`` preset: continuous speculative decoding with digits-mar-draft, one word
away from the defaults (``preset="cspd"``, ``--preset cspd``), stored beside ``defaults`` in its config.json."""
from __future__ import annotations

import pytest
import torch

from varkit import load_pipeline
from varkit.cli import main

torch.set_num_threads(1)
FAST = dict(num_iter=4, head_steps=10)  # a short schedule: the draft follows the same settings (checked by cspd)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("digits-mar")


def test_preset_names_the_cspd_sampler_and_its_draft(pipe):
    assert pipe.presets["cspd"] == {"sampler": "cspd", "sampler_options": {"draft": "digits-mar-draft"}}
    assert pipe.sampler_choice(None, "cspd") == ("cspd", {"draft": "digits-mar-draft"})
    assert pipe.sampler_choice(None) == ("ancestral", {})  # the defaults stay MAR's own sampler
    assert pipe.sampler_choice("ancestral", "cspd") == ("ancestral", {})  # an explicit sampler wins


def test_preset_generates_with_the_draft(pipe):
    out = pipe(class_labels=[3], preset="cspd", output_type="pt", **FAST)
    assert out.images.shape[0] == 1 and out.stats.draft_passes > 0  # the drafter ran: it was cspd
    assert out.stats.forward_passes <= FAST["num_iter"]


def test_cli_generate_with_the_preset(tmp_path, capsys):
    dest = tmp_path / "three.png"
    assert main(["generate", "--model", "digits-mar", "--preset", "cspd", "--classes", "3", "--num-iter", "4",
                 "--head-steps", "10", "--out", str(dest)]) == 0
    assert dest.is_file()
