"""engines.bench end to end at tiny sizes: the JSON schema (never wall-clock values), and the perf switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines import bench
from mqvae.runtime.perf import apply_perf

from helpers import tiny_config, tiny_engine

ROOT = Path(__file__).resolve().parents[1]

TINY = ["model.hidden_channels=8", "model.res_channels=4", "model.num_res_blocks=1", "quantizer.num_codes=16",
        "quantizer.dim=4", "device=cpu"]
SIZES = {"digits_batch": 8, "paper_batch": 2, "warmup": 1, "paper_warmup": 1, "rounds": {"digits": 2, "paper": 1},
         "profile_rounds": {"digits": 1, "paper": 1},
         "nn_grid": [(256, 32, 8)], "nn_min_time": 0.0, "ttq_iters": 4, "ttq_eval_every": 2, "overrides": TINY,
         "data_parallel": False}  # test_data_parallel_step_times_compare_the_same_global_batch runs it alone


def test_bench_writes_the_documented_schema(tmp_path, monkeypatch, capsys):
    # An N x K matrix over the budget is reported as skipped, not dropped.
    monkeypatch.setattr(bench, "_memory_budget", lambda device: 64 * 1024)
    # An idle machine before, a loaded one after.
    loads = iter([(0.5, 0.25, 0.75), (os.cpu_count() + 1.5, 0.5, 0.25)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    result = bench.run_bench(quick=True, sizes={**SIZES, "nn_grid": [(256, 32, 8), (1024, 64, 8)]})
    result = json.loads(json.dumps(result))  # JSON-serializable

    # One line on stderr as each part starts (the data-parallel part is left out here).
    stderr = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in stderr if line.startswith("engines.bench ")] == [
        "engines.bench 1/6: training-step cost, digits shape", "engines.bench 2/6: training-step cost, paper shape",
        "engines.bench 3/6: cost of the per-step checks", "engines.bench 4/6: speed switches, paper shape",
        "engines.bench 5/6: nearest-neighbour search", "engines.bench 6/6: time to quality"]
    if not torch.cuda.is_available():  # (the switches act on CUDA only: on the CPU the part says so)
        assert result["switches"] == {"skipped": "the speed switches act on CUDA only (perf.cuda_graphs is refused "
                                                 "on the CPU)"}
        assert "Speed switches: not measured" in bench.summary(result)
    assert result["load"] == {"cores": os.cpu_count(), "before": [0.5, 0.25, 0.75],
                              "after": [os.cpu_count() + 1.5, 0.5, 0.25], "under_load": True}
    warning = [line for line in bench.summary(result).splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and f"above its {os.cpu_count()} cores" in warning[0], warning
    result["load"]["under_load"] = False
    assert "warning: " not in bench.summary(result)

    env = result["environment"]
    assert {"device", "torch", "threads"} <= env.keys()
    assert set(result["step_time_ratio"]) == {"digits", "paper"}
    for shape, ratios in result["step_time_ratio"].items():
        assert set(ratios) == set(bench.MODES) - {"vqvae"}
        assert all(isinstance(r, float) and r > 0 for r in ratios.values())
        step = result["step_time"][shape]
        assert set(step["median_s"]) == set(bench.MODES)
        assert step["batch_size"] == (8 if shape == "digits" else 2)
    assert result["step_time"]["paper"]["input_shape"] == [3, 32, 32]
    for shape, step in result["step_time"].items():  # (the counts themselves: test_the_operation_counter_...)
        counts = step["operations_per_iteration"]
        assert set(counts) == set(bench.MODES) and all(isinstance(n, float) and n > 0 for n in counts.values()), shape
    assert "Operations dispatched per iteration" in bench.summary(result)

    rows = result["nn_search"]["rows"]
    assert [(r["N"], r["method"]) for r in rows] == [(256, "chunked"), (256, "naive"), (1024, "chunked"), (1024, "naive")]
    for row in rows[:2]:
        assert row["status"] == "ok", row
        assert {"vectors_per_s", "peak_extra_bytes", "memory_method"} <= row.keys()
    assert rows[3]["status"] == "skipped" and "GiB" in rows[3]["reason"]

    # Where the time goes: every phase each mode runs, and only those (the phases' names, not their times).
    phases = result["step_time"]["digits"]["phases_ms"]
    steps = {name for p in ("forward", "backward", "optimizer_step") for name in (f"codebook.{p}", f"autoencoder.{p}")}
    assert set(phases["vqvae"]) == {"iteration", "vqvae.forward", "vqvae.backward", "vqvae.optimizer_step"}
    assert set(phases["alt"]) == {"iteration"} | steps
    assert set(phases["mqvae"]) == {"iteration", "hypergradient.mqvae"} | steps
    assert set(phases["mqvae_roll_back"]) == {"iteration", "hypergradient.mqvae", "autoencoder.roll_back"} | steps
    undo = {"codebook.undo_tentative_step", "autoencoder.undo_tentative_step"}
    assert set(phases["mqvae_ddagger"]) == {"iteration", "hypergradient.mqvae", "codebook.tentative_step"} | undo | steps
    for mode in bench.UNROLL_STEPS:  # (a window of k iterations per sample: the codebook's step is in each)
        assert set(phases[mode]) == set(phases["mqvae"]), mode
    assert all(v >= 0 for p in phases.values() for v in p.values())

    finite = result["finite_check"]
    assert finite["step_s"] > 0 and finite["flag_update_s"] > 0 and finite["check_s"] >= 0
    assert finite["flag_update_fraction_of_step"] == pytest.approx(finite["flag_update_s"] / finite["step_s"], rel=0.01, abs=1e-5)
    assert finite["zero_gradient_update_s"] > 0
    assert finite["zero_gradient_update_fraction_of_step"] == pytest.approx(
        finite["zero_gradient_update_s"] / finite["step_s"], rel=0.01, abs=1e-5)

    # Time to quality: three seeds by default, --quick too; every seed's own figures; nulls with their reason.
    ttq = result["time_to_quality"]
    assert ttq["config"]["seeds"] == [0, 1, 2] and [row["seed"] for row in ttq["per_seed"]] == [0, 1, 2]
    for row in ttq["per_seed"]:
        assert row["vqvae_final_test_mse"] > 0 and row["mqvae_final_test_mse"] > 0
        assert row["vqvae_total_time_s"] > 0 and row["mqvae_total_time_s"] > 0
        assert row["curves"]["vqvae"][-1] == [row["vqvae_total_time_s"], row["vqvae_final_test_mse"]]
        if row["mqvae_time_to_reach_s"] is None:
            assert row["ratio_to_vqvae_time"] is None and row["mqvae_time_to_reach_s_reason"].startswith("never reached")
        else:
            assert row["ratio_to_vqvae_time"] > 0 and row["mqvae_time_to_reach_s_reason"] is None
    assert ttq["seeds_reached"] == sum(row["ratio_to_vqvae_time"] is not None for row in ttq["per_seed"])
    assert (ttq["median_ratio_to_vqvae_time"] is None) != (ttq["median_ratio_to_vqvae_time_reason"] is None)
    if 2 * ttq["seeds_reached"] <= len(ttq["per_seed"]):
        assert ttq["median_ratio_to_vqvae_time_reason"].startswith("not reached")
    assert "|" in bench.summary(result)


def test_the_operation_counter_counts_each_dispatched_operator():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3)
    counter = bench.OperationCounter()
    with counter:
        (a + b).mul(2).sum()  # add, mul, sum
    assert counter.count == 3
    counter = bench.OperationCounter()
    with counter:
        (a * b).sum().backward()  # forward: mul, sum; backward: ones_like (the seed), expand, mul, detach (into .grad)
    assert counter.count == 6


def test_operations_are_counted_for_every_mode_alone():
    """``--operations``: the counts without timing, of every mode; a mode that does more dispatches more."""
    counts = bench.operation_counts("digits", 8, 1, TINY)
    assert set(counts) == set(bench.MODES) and all(n > 0 for n in counts.values())
    assert counts["vqvae"] < counts["alt"] < counts["mqvae"] < counts["mqvae_roll_back"] < counts["mqvae_ddagger"]


@pytest.mark.parametrize("before, after, under_load", [(2.0, 1.5, False), (2.01, 0.5, True), (0.5, 2.5, True)],
                         ids=["at-most-the-cores", "loaded-before", "loaded-after"])
def test_a_figure_taken_under_load_is_flagged(monkeypatch, before, after, under_load):
    """On 2 cores: a 1-minute load average above 2, before or after the run, flags it; the 5- and 15-minute averages,
    which reach back before the run's start, are recorded and do not decide."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (after, 7.0, 9.0))
    assert bench.machine_load((before, 7.0, 9.0)) == {"cores": 2, "before": [before, 7.0, 9.0],
                                                      "after": [after, 7.0, 9.0], "under_load": under_load}


# Three profiled iterations of a tiny engine, in a process of their own.
PROFILED = """
import sys
from pathlib import Path

from engines import bench
from helpers import tiny_engine

engine = tiny_engine(Path(sys.argv[1]))
engine.train()
bench.phase_times("mqvae", engine, 3)
"""


def test_the_profiler_writes_nothing_on_stderr(tmp_path):
    """Kineto's own lines ("USDT: ... profiler_start", and on a CPU-only machine "gpuGetDeviceCount failed") stay off
    stderr. In a fresh process without KINETO_LOG_LEVEL, because Kineto reads its level once, at its first start."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", PROFILED, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def _seed(ratio, mqvae_time=2.0, vqvae_time=1.0):
    """A per-seed row as seed_time_to_quality writes it (only the fields the median reads)."""
    return {"ratio_to_vqvae_time": ratio, "mqvae_total_time_s": mqvae_time, "vqvae_total_time_s": vqvae_time}


def test_median_over_seeds_counts_seeds_that_never_reached_the_quality():
    assert bench.median_ratio([_seed(1.2), _seed(1.9), _seed(1.5)]) == (1.5, None)
    # One seed of three never reached it in 2.0x VQ-VAE's time, above both others: the median is the slower one,
    # not 1.35, the median of the two that reached it.
    assert bench.median_ratio([_seed(1.2), _seed(None), _seed(1.5)]) == (1.5, None)
    # Two of three never reached it: no median, however fast the third.
    value, reason = bench.median_ratio([_seed(1.2), _seed(None), _seed(None)])
    assert value is None and reason.startswith("not reached: 1 of 3 seeds")
    # Half of four is not more than half: the upper middle value is a never-reached seed.
    value, reason = bench.median_ratio([_seed(1.2), _seed(1.3), _seed(None), _seed(None)])
    assert value is None and reason.startswith("not reached: 2 of 4 seeds")
    # A seed that ran only 1.4x VQ-VAE's time without reaching it may lie below 1.5: the median is not known.
    value, reason = bench.median_ratio([_seed(1.2), _seed(None, mqvae_time=1.4), _seed(1.5)])
    assert value is None and reason.startswith("undetermined") and "between 1.4 and 1.5" in reason


def test_cuda_perf_switches_are_documented_noops_on_cpu(tmp_path):
    engine = tiny_engine(tmp_path, perf={"bf16": True, "compile": True})
    assert engine.perf_applied == {"channels_last": True, "cudnn_benchmark": False, "bf16": False, "compile": False,
                                  "cuda_graphs": False}
    reference = tiny_engine(tmp_path / "ref")
    engine.train_step()
    reference.train_step()
    for (name, got), (_, want) in zip(engine.model.state_dict().items(), reference.model.state_dict().items()):
        assert torch.equal(got, want), name
    assert apply_perf(tiny_config().perf, engine.model, torch.device("cpu"))["bf16"] is False


def test_channels_last_trains_like_nchw(tmp_path):
    """perf.channels_last stores the convolution weights NHWC and changes values only by rounding: three
    MQ-VAE iterations (tentative step, Eq. 13 finite differences, roll-back) against the NCHW run."""
    hyper = {"roll_back": True}
    nhwc = tiny_engine(tmp_path / "nhwc", hypergradient=hyper)
    nchw = tiny_engine(tmp_path / "nchw", hypergradient=hyper, perf={"channels_last": False})
    second_conv = [m for m in nhwc.model.encoder.modules() if isinstance(m, torch.nn.Conv2d)][1]
    assert second_conv.weight.is_contiguous(memory_format=torch.channels_last) and not second_conv.weight.is_contiguous()
    assert all(p.is_contiguous() for p in nchw.model.parameters())
    for engine in (nhwc, nchw):
        for step in range(3):
            engine.global_step = step + 1
            engine.train_step()
    got, want = nhwc.model.state_dict(), nchw.model.state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.long("it starts two gloo ranks and one process per mode, each a torchrun job of its own: most of its "
                  "time is their start-up, which the timed steps cannot avoid")
def test_data_parallel_step_times_compare_the_same_global_batch():
    result = bench.data_parallel(batch_size=4, warmup=1, rounds=2)
    assert result["global_batch"] == 8 and set(result["modes"]) == {"vqvae", "mqvae"}
    for row in result["modes"].values():
        assert row["ranks"]["ranks"] == 2 and row["ranks"]["batch_per_rank"] == 4
        assert row["one_process"]["ranks"] == 1 and row["one_process"]["batch_per_rank"] == 8
        assert row["ranks"]["median_s"] > 0 and row["one_process"]["median_s"] > 0
        # (the ratio is rounded to 3 decimals, as the other ratios)
        assert row["ratio_ranks_to_one_process"] == pytest.approx(
            row["ranks"]["median_s"] / row["one_process"]["median_s"], rel=0.01, abs=5e-4)
