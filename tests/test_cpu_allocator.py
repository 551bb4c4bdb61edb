"""varkit's caching CPU allocator: reuse, the cap, the fallbacks, fork, and the switch."""
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

from varkit.errors import InvalidArgumentError
from varkit.nn import cpu_allocator as ca
from varkit.nn.cpu_kernels import cpu_kernels

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="no C++ toolchain to build the extension here")

MIB = 1 << 20


@pytest.fixture
def allocator():
    """The allocator installed with its default cap (restored after a test that changes it), cache emptied."""
    assert ca.install()
    ca.empty_cache()
    yield
    ca.install(ca.cap_bytes())
    ca.empty_cache()


@needs_kernels
def test_a_freed_block_serves_the_next_request_of_its_size_class(allocator):
    a = torch.empty(5 * MIB + 123, dtype=torch.uint8)
    where = a.data_ptr()
    assert where % (2 * MIB) == 0  # 2 MiB-aligned: huge-page friendly
    before = ca.stats()
    del a
    freed = ca.stats()
    assert freed["cached_blocks"] == before["cached_blocks"] + 1
    assert freed["cached_bytes"] == before["cached_bytes"] + 6 * MIB  # 5 MiB + 123 bytes -> the 6 MiB class
    b = torch.empty(5 * MIB + 4000, dtype=torch.uint8)  # same class: the same block
    assert b.data_ptr() == where
    after = ca.stats()
    assert after["hits"] == freed["hits"] + 1 and after["cached_bytes"] == before["cached_bytes"]


@needs_kernels
def test_small_blocks_stay_with_torch_and_every_path_frees_correctly(allocator):
    owned = ca.stats()["blocks"]
    small = [torch.randn(1000) for _ in range(50)]
    assert ca.stats()["blocks"] == owned
    del small
    s = torch.empty(1000).untyped_storage()  # torch's block, grown past the threshold: ours, the old one freed
    s.resize_(3 * MIB)
    assert ca.stats()["blocks"] == owned + 1 and s.nbytes() == 3 * MIB
    del s
    x = torch.randn(700, 700)
    assert torch.equal((x @ torch.eye(700)), x)  # products into cached blocks: values as usual
    n = torch.arange(600 * 600, dtype=torch.float32).numpy()  # numpy views keep the block alive
    assert n[-1] == 600 * 600 - 1
    y = torch.randn(800, 800)
    assert torch.equal(y.clone(), y)


@needs_kernels
def test_the_cap_bounds_the_free_bytes_kept_and_empty_cache_returns_them(allocator):
    ca.install(3 * MIB)  # later calls only change the cap
    a, b = torch.empty(2 * MIB + 1, dtype=torch.uint8), torch.empty(2 * MIB + 1, dtype=torch.uint8)  # 2.25 MiB class
    released = ca.stats()["released"]
    del a
    del b  # 4.5 MiB would pass the cap: this one goes back to the system
    st = ca.stats()
    assert st["cached_bytes"] == 2 * MIB + 256 * 1024 and st["released"] == released + 1
    assert st["cap_bytes"] == 3 * MIB
    ca.empty_cache()
    assert ca.stats()["cached_bytes"] == 0 and ca.stats()["cached_blocks"] == 0


def _child_sum(_: int) -> float:
    torch.set_num_threads(1)  # as DataLoader workers: OpenMP's pool does not survive a fork (a hang, allocator or not)
    x = torch.ones(2 * MIB)  # 8 MiB: a cached block in the child
    del x
    return float(torch.ones(2 * MIB).sum())


@needs_kernels
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_forked_children_allocate_through_the_cache(allocator):
    keep = torch.empty(3 * MIB, dtype=torch.uint8)  # the parent holds blocks of its own across the fork
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_child_sum, range(4)) == [float(2 * MIB)] * 4
    del keep


def test_the_cap_comes_from_the_environment_with_clear_errors():
    assert ca.cap_bytes({"VARKIT_CPU_CACHE_MB": "0"}) == 0
    assert ca.cap_bytes({"VARKIT_CPU_CACHE_MB": "64"}) == 64 * MIB
    assert 0 < ca.cap_bytes({}) <= ca.DEFAULT_CAP_BYTES
    with pytest.raises(InvalidArgumentError, match="VARKIT_CPU_CACHE_MB must be a whole number"):
        ca.cap_bytes({"VARKIT_CPU_CACHE_MB": "lots"})
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        ca.cap_bytes({"VARKIT_CPU_CACHE_MB": "-1"})


@needs_kernels
@pytest.mark.parametrize("env, expected", [("0", "False"), ("", "True")])
def test_load_pipeline_installs_it_on_a_cpu_unless_switched_off(env, expected):
    code = ("import varkit\nfrom varkit.nn import cpu_allocator as ca\nassert not ca.installed()\n"
            "varkit.load_pipeline('digits')\nprint(ca.installed())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VARKIT_CPU_CACHE_MB": env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected


def test_a_bad_cap_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys):
    from varkit.cli import main

    monkeypatch.setenv("VARKIT_CPU_CACHE_MB", "lots")
    code = main(["generate", "--model", "digits", "--classes", "1", "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "VARKIT_CPU_CACHE_MB must be a whole number" in err[0]
    assert list(tmp_path.iterdir()) == []
