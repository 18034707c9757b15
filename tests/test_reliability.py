"""Run folders under faults: one run per folder, atomic files, locks, kills, full disks, non-finite state, provenance.

Behaviour of the command line is tested through the real CLI in a subprocess (``run_cli``); faults the OS
cannot be asked for on demand are injected into that subprocess (``run_cli_with``).
"""

from __future__ import annotations

import hashlib
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import run
from engines.engine import LevelEngine
from helpers import interrupt_at, measured, results
from test_run import ROOT, TINY, assert_one_line_error, run_cli

ARGS = ["configs/digits/vqvae.yaml", *TINY, "--set", "train.iters=6", "--set", "train.checkpoint_every=2"]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def final_metrics(folder: Path) -> dict:
    return results(json.loads((folder / "metrics.json").read_text()))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run of ARGS, the reference for every fault below."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli(*ARGS, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.name != ".lock":
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


# -- one run per folder -------------------------------------------------------------------------------

def test_a_new_run_refuses_a_folder_holding_a_run_and_overwrite_replaces_it(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    before = snapshot(out)
    result = run_cli(*ARGS, "--set", "train.iters=3", "--out", out)
    assert_one_line_error(result, str(out), "holds another run", "--overwrite", "--resume")
    assert snapshot(out) == before  # nothing of the finished run was touched

    assert run_cli(*ARGS, "--set", "train.iters=3", "--out", out, "--overwrite").returncode == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 3
    records = measured(out)
    assert [r["step"] for r in records if "vqvae.loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "test_mse" in r] == [3]  # the new run's final evaluation only


def test_out_naming_a_file_is_one_line(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert_one_line_error(run_cli(*ARGS, "--out", target), str(target), "is a file")
    assert target.read_text() == "keep me"


def test_a_second_process_on_a_locked_folder_gets_one_line_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mqvae.io.files import FolderLock\n"
                               f"with FolderLock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_cli(*ARGS, "--out", out)
        assert_one_line_error(result, str(out), "in use by another run", f"process {holder.pid}")
        assert not (out / "config.yaml").exists() and not (out / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_concurrent_runs_on_one_folder_leave_one_uninterrupted_run(tmp_path, finished):
    out = tmp_path / "run"
    command = [sys.executable, "run.py", *map(str, ARGS), "--out", str(out)]
    procs = [subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and ("in use by another run" in loser or "holds another run" in loser)
    assert final_metrics(out) == final_metrics(finished)
    assert (out / "log.jsonl").read_text().count('"step": 1,') == 1  # one run's log, not two interleaved


def test_stale_temp_files_are_removed_at_start(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    (out / ".checkpoint.pt.999.dead.tmp").write_bytes(b"x" * 1000)
    assert run_cli("--resume", out, "--set", "train.iters=7").returncode == 0
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


# -- kills: resume stays exact ----------------------------------------------------------------------------

@pytest.mark.parametrize("kill_after_s", [4.0, 6.0, 8.0])
def test_kill_9_at_any_point_then_resume_ends_like_an_uninterrupted_run(tmp_path, finished, kill_after_s):
    out = tmp_path / "run"
    # Slow each iteration down a little so the kill lands inside training, not after it.
    proc = subprocess.Popen([sys.executable, "run.py", *map(str, ARGS), "--set", "train.iters=40", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(kill_after_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "config.yaml").exists():  # before its first checkpoint, a resumed run starts again from iteration 0
        result = run_cli("--resume", out)
    else:  # killed before the run took the folder: nothing was written
        assert not (out / "log.jsonl").exists()
        result = run_cli(*ARGS, "--set", "train.iters=40", "--out", out)
    assert result.returncode == 0, result.stderr
    reference = tmp_path / "reference"
    assert run_cli(*ARGS, "--set", "train.iters=40", "--out", reference).returncode == 0
    assert final_metrics(out) == final_metrics(reference)
    assert measured(out) == measured(reference)  # one run's log: each iteration once, the final evaluation once


def test_kill_9_in_the_middle_of_a_shipped_sweep_then_a_rerun_keeps_the_finished_runs(tmp_path):
    # From a scratch working folder, as a researcher runs a shipped sweep: killed while its second run trains
    # (after that run's first checkpoint); the rerun keeps the first run, resumes the second. (The shipped sweep
    # with two runs: a longer one adds only runs that nothing interrupts.)
    sweep = ROOT / "configs" / "tables" / "fig3_sources_digits.yaml"
    args = [sys.executable, str(ROOT / "run.py"), str(sweep), *TINY, "--set", "train.iters=60",
            "--set", "train.checkpoint_every=5", "--set", "train.eval_every=0", "--set", "eval.image_quality=off",
            "--seeds", "0", "--out", "sweep"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        runs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/seed0/checkpoint.pt"))
        finished = [p for p in runs if (p / "metrics.json").exists()]
        if len(finished) == 1 and len(runs) == 2:
            second = next(p for p in runs if p not in finished)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert second is not None and not (second / "metrics.json").exists()
    first = finished[0]
    kept = (first / "metrics.json").read_bytes()
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"finished earlier with this config, kept ({Path('sweep') / first.relative_to(tmp_path / 'sweep')})" in result.stdout
    assert f"resuming in {Path('sweep') / second.relative_to(tmp_path / 'sweep')}" in result.stdout, result.stdout
    assert (first / "metrics.json").read_bytes() == kept
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert all(r["metrics"]["iterations"] == 60 for r in results["runs"])
    records = map(json.loads, (second / "log.jsonl").read_text().splitlines())
    steps = [r["step"] for r in records if any(key.endswith(".loss") for key in r)]
    assert steps == list(range(1, 61))  # each training step logged once: the resume dropped what the kill left


def test_resuming_a_run_stopped_before_its_first_checkpoint_starts_it_again(tmp_path, finished):
    out = tmp_path / "run"
    result = run_cli(*ARGS, "--set", "train.checkpoint_every=0", "--set", "levels.0.lr=1.0e38", "--out", out)
    assert result.returncode == 2 and not (out / "checkpoint.pt").exists() and (out / "config.yaml").exists()
    (out / "config.yaml").write_text((finished / "config.yaml").read_text())  # as if killed before a checkpoint
    assert run_cli("--resume", out).returncode == 0
    assert final_metrics(out) == final_metrics(finished)


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(tmp_path, finished, monkeypatch):
    out = tmp_path / "cut"
    restore = interrupt_at(monkeypatch, 5)
    assert run.main([*ARGS, "--out", str(out)]) == 130
    restore()
    with open(out / "log.jsonl", "a") as log:  # what a kill in the middle of a write leaves
        log.write('{"step": 5, "vqvae.lo')
    assert run_cli("--resume", out).returncode == 0
    assert final_metrics(out) == final_metrics(finished)
    assert measured(out) == measured(finished)  # one run's log: no torn line, the final evaluation once


# -- faults of the machine ------------------------------------------------------------------------------

def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    checkpoint = (out / "checkpoint.pt").read_bytes()
    limit = len(checkpoint) // 2  # RLIMIT_FSIZE: the kernel fails any write past this size (EFBIG)

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "run.py", "--resume", str(out), "--set", "train.iters=8"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, preexec_fn=small_disk)
    assert_one_line_error(result, str(out / "checkpoint.pt"), "cannot write", "previous version of the file is kept")
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert (out / "config.yaml").read_text() == (finished / "config.yaml").read_text()  # still the run's own
    assert not list(out.glob(".*.tmp"))
    assert run_cli("--resume", out, "--set", "train.iters=8").returncode == 0  # and the run continues from it


def run_cli_with(fault: str, *args):
    """The CLI in a subprocess with a fault injected into ``open``: what the OS would do on that path."""
    driver = f"import errno, sys, builtins, os, run\n{fault}\nsys.exit(run.main({[str(a) for a in args]!r}))"
    return subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_read_only_run_folder_is_one_line_and_loses_nothing(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    before = snapshot(out)
    read_only = f"""
FOLDER = {str(out)!r}
real_open, real_os_open = builtins.open, os.open
def refuse(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
def fake_open(path, mode="r", *a, **k):
    if str(path).startswith(FOLDER) and any(c in mode for c in "wax+"):
        refuse(path)
    return real_open(path, mode, *a, **k)
def fake_os_open(path, flags, *a, **k):
    if str(path).startswith(FOLDER) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        refuse(path)
    return real_os_open(path, flags, *a, **k)
builtins.open, os.open = fake_open, fake_os_open
"""
    result = run_cli_with(read_only, "--resume", out, "--set", "train.iters=8")
    assert_one_line_error(result, str(out), "Read-only file system")
    assert snapshot(out) == before


# -- no non-finite state on disk ------------------------------------------------------------------------------

@pytest.mark.parametrize("when", ["before_the_loss", "after_the_loss"])
def test_no_checkpoint_with_non_finite_values_is_written(tmp_path, monkeypatch, when):
    """A weight turns NaN after iteration 3: either the next loss is NaN (caught by the on-device flag before
    the iteration-4 checkpoint) or, injected after iteration 4's loss, only the state is (caught by the state
    check). Logging is off in between, so no logging step sees it first."""
    out = tmp_path / "run"
    original = LevelEngine.train_step

    def poisoned(self):
        original(self)
        if (self.global_step, when) in ((3, "before_the_loss"), (4, "after_the_loss")):
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(LevelEngine, "train_step", poisoned)
    assert run.main([*ARGS, "--set", "train.log_every=100", "--out", str(out)]) == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["levels"]["vqvae"].values() if v.is_floating_point())


def test_the_non_finite_error_names_the_last_good_checkpoint(tmp_path):
    result = run_cli(*ARGS, "--set", "train.log_every=100", "--set", "levels.0.lr=1.0e38", "--out", tmp_path / "run")
    assert_one_line_error(result, "non-finite" if "non-finite" in result.stderr else "NaN or infinite")
    assert "no checkpoint was written" in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# -- provenance ------------------------------------------------------------------------------------------

def test_config_yaml_is_the_resolved_config_with_its_hash(finished):
    text = (finished / "config.yaml").read_text()
    first = text.splitlines()[0]
    data = yaml.safe_load(text)
    # An independent hash: the mapping as canonical JSON.
    expected = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert first.startswith(f"# config_sha256: {expected}")
    assert json.loads((finished / "metrics.json").read_text())["config_sha256"] == expected
    assert data["quantizer"]["kmeans_iters"] == 10 and data["train"]["checkpoint_every"] == 2  # defaults resolved


def test_resume_reads_the_run_folders_config_and_allows_only_extending_changes(tmp_path, finished):
    out = copy_run(finished, tmp_path / "run")
    before = snapshot(out)
    result = run_cli("--resume", out, "--set", "levels.0.lr=0.5", "--set", "quantizer.beta=0.2")
    assert_one_line_error(result, "levels.vqvae.lr", "quantizer.beta", "train.iters")
    assert snapshot(out) == before
    result = run_cli("configs/digits/mqvae.yaml", "--resume", out)
    assert_one_line_error(result, "levels")
    # Fewer iterations than the checkpoint has trained: training cannot go back, and the folder stays as it was.
    result = run_cli("--resume", out, "--set", "train.iters=5")
    assert result.returncode == 2
    assert_one_line_error(result, "train.iters=5 is below the 6 iterations")
    assert snapshot(out) == before

    assert run_cli("--resume", out, "--set", "train.iters=8", "--set", "train.log_every=2").returncode == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["iters"] == 8
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 8


def test_a_sweep_reuses_a_run_only_with_the_planned_config(tmp_path):
    from test_sweep import TINY as SWEEP_TINY, write_sweep  # 2 iterations: runs of the shipped length took minutes

    path, out = write_sweep(tmp_path), tmp_path / "sweep"
    assert run.main([str(path), *SWEEP_TINY, "--out", str(out)]) == 0
    first = out / "vq-vae" / "seed0"
    (first / "metrics.json").write_text('{"test_mse": 0.1')  # torn by a foreign writer
    result = subprocess.run([sys.executable, "run.py", str(path), *SWEEP_TINY, "--set", "train.iters=3", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "kept" not in result.stdout and result.stdout.count("running it again") == 4, result.stdout
    results = json.loads((out / "results.json").read_text())
    assert {r["metrics"]["iterations"] for r in results["runs"]} == {3}
    for r in results["runs"]:
        assert yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())["train"]["iters"] == 3


def test_a_sweep_keeps_a_run_whose_config_lacks_only_keys_added_since(tmp_path):
    """A run made before a config section existed (its config.yaml lacks ``eval``, ``logging`` and ``imports``)
    was made with those keys' defaults: a restarted sweep keeps it rather than training it again."""
    from test_sweep import TINY as SWEEP_TINY, write_sweep

    path, out = write_sweep(tmp_path), tmp_path / "sweep"
    assert run.main([str(path), *SWEEP_TINY, "--out", str(out)]) == 0
    first = out / "vq-vae" / "seed0"
    saved = yaml.safe_load((first / "config.yaml").read_text())
    for key in ("eval", "logging", "imports"):
        del saved[key]
    (first / "config.yaml").write_text(yaml.safe_dump(saved))
    (first / "metrics.json").write_text(json.dumps({**json.loads((first / "metrics.json").read_text()), "marker": 1}))
    result = subprocess.run([sys.executable, "run.py", str(path), *SWEEP_TINY, "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finished earlier with this config, kept") == 4, result.stdout
    assert json.loads((first / "metrics.json").read_text())["marker"] == 1


# -- what the independent fuzz found ----------------------------------------------------------------------

@pytest.mark.parametrize("args", [[], ["configs/digits/vqvae.yaml", "--bogus"], ["configs/digits/vqvae.yaml", "--set"]])
def test_command_line_mistakes_are_one_line(args):
    assert_one_line_error(run_cli(*args), "error:", "python run.py -h")


def test_a_bit_flipped_inside_a_checkpoint_weight_is_refused(tmp_path, finished):
    import zipfile

    out = copy_run(finished, tmp_path / "run")
    with zipfile.ZipFile(out / "checkpoint.pt") as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray((out / "checkpoint.pt").read_bytes())
    # A stored record's data follows its 30-byte local header, file name and extra field.
    name_length, extra_length = (int.from_bytes(data[record.header_offset + i:record.header_offset + i + 2], "little")
                                 for i in (26, 28))
    start = record.header_offset + 30 + name_length + extra_length
    data[start + record.file_size // 2] ^= 0x10
    (out / "checkpoint.pt").write_bytes(bytes(data))
    before = snapshot(out)
    assert_one_line_error(run_cli("--resume", out, "--set", "train.iters=8"), "checkpoint.pt", "checksum")
    assert snapshot(out) == before


@pytest.mark.parametrize("key, value", [("lr", "x"), ("lr", float("nan")), ("betas", "ab"), ("step", -5)])
def test_a_damaged_optimizer_entry_is_refused_and_the_folder_kept(tmp_path, finished, key, value):
    out = copy_run(finished, tmp_path / "run")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    optimizer = state["optimizers"]["vqvae"]
    if key == "step":  # Adam's per-parameter step count
        optimizer["state"][0]["step"] = torch.tensor(float(value))
    else:
        optimizer["param_groups"][0][key] = value
    torch.save(state, out / "checkpoint.pt")
    before = snapshot(out)
    assert_one_line_error(run_cli("--resume", out, "--set", "train.iters=8"), "checkpoint", key)
    assert snapshot(out) == before  # config.yaml too: a resume that fails leaves the folder as it was


def test_exhausted_memory_is_one_line(tmp_path):
    def small_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    # No warm-up: its 100 unquantized steps may fit in the limit and take minutes each at this size; the training
    # step that does not fit is the case here.
    result = subprocess.run([sys.executable, "run.py", *ARGS, "--set", "model.hidden_channels=256",
                             "--set", "model.res_channels=128", "--set", "data.batch_size=1500",
                             "--set", "quantizer.kmeans_warmup=0", "--out",
                             str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            preexec_fn=small_memory)
    assert_one_line_error(result, "out of memory", "data.batch_size")


def test_batch_norm_with_one_value_per_channel_is_one_line(tmp_path):
    result = run_cli(*ARGS, "--set", "model.norm=batch", "--set", "model.downsample=4", "--set", "data.batch_size=1",
                     "--out", tmp_path / "run")
    assert_one_line_error(result, "data.batch_size", "2 values per channel")
