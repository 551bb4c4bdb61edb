"""The part timer and machine rates shared by ``varkit bench mar`` and ``varkit bench flowar``."""
from __future__ import annotations

import time

import torch

from varkit.bench.flowar import Split as FlowSplit
from varkit.bench.mar import Split as MarSplit
from varkit.bench.partwise import best_machine, instrument, machine_rates, measure_machine


class Net:
    def forward(self, x):
        return x + 1

    def busy(self, seconds):
        t0 = time.process_time()
        while time.process_time() - t0 < seconds:
            pass


def test_part_timer_sums_wrapped_calls_and_counts_in_place():
    net, split, forward = Net(), MarSplit(), Net.forward
    instrument(net, "busy", split.timed("head"))
    instrument(net, "forward", split.count_rows())
    net.busy(0.02)
    net.busy(0.02)
    net.forward(torch.zeros(3, 5))
    assert split.cpu["head"] >= 0.04 and split.seconds["head"] >= split.cpu["head"] * 0.5
    assert split.cpu["transformer"] == 0.0 and split.net_rows == [3]
    rows = split.net_rows
    split.reset()  # the wrappers hold the list: reset empties it in place
    assert split.cpu == dict.fromkeys(split.parts, 0.0) and rows == [] and rows is split.net_rows
    net.forward(torch.zeros(2, 4))
    assert split.net_rows == [2]
    assert Net.forward is forward and "forward" in vars(net)  # an instance attribute: the class is untouched


def test_flowar_split_records_rows_and_tokens():
    net, split = Net(), FlowSplit()
    instrument(net, "forward", split.count_shapes(split.calls))
    net.forward(torch.zeros(4, 7, 2))
    split.reset()
    net.forward(torch.zeros(2, 3, 2))
    assert split.calls == [(2, 3)] and split.prepares == []


def test_machine_rates_are_the_best_of_each_measurement():
    m = measure_machine({"head_4": 1 << 16}, [torch.float32], big_bytes=1 << 20, conv_hw=16, gemm_size=64)
    assert set(m["bandwidth_Bps"]) == {"large", "head_4"} and m["clock"] == "process_time"
    assert all(v > 0 for v in m["bandwidth_Bps"].values()) and m["gemm_flops"]["float32"] > 0 and m["conv_flops"] > 0
    slow = {**m, "bandwidth_Bps": {k: v / 2 for k, v in m["bandwidth_Bps"].items()},
            "gemm_flops": {"float32": m["gemm_flops"]["float32"] * 2}, "conv_flops": m["conv_flops"] / 2}
    best = best_machine(m, slow)
    assert best["bandwidth_Bps"] == m["bandwidth_Bps"] and best["conv_flops"] == m["conv_flops"]
    assert best["gemm_flops"]["float32"] == 2 * m["gemm_flops"]["float32"]
    assert best_machine(None, m) is m and machine_rates(m, None, {"head_4": 1 << 16}) is m
