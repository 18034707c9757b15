"""load_checkpoint: a real checkpoint loads and resumes; every schema deviation is one UserError line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from helpers import snapshot, tiny_engine
from mqvae.io.checkpoint import load_checkpoint
from mqvae.config import load_config, to_dict
from mqvae.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The state of a two-level run after two iterations: Adam moments, a stream position, a step."""
    engine = tiny_engine(tmp_path_factory.mktemp("run"))
    with torch.random.fork_rng():
        engine.run()
    return engine.state_dict()


def _save(state, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    return path


def test_real_checkpoint_loads(trained, tmp_path):
    state = load_checkpoint(_save(trained, tmp_path))
    assert set(state["levels"]) == {"codebook", "autoencoder"}
    assert state["step"] == 2 and state["streams"]["autoencoder"]["position"] == 2
    assert torch.equal(state["levels"]["codebook"]["codebook"], trained["levels"]["codebook"]["codebook"])


def test_optional_entries_may_be_absent_or_present(trained, tmp_path):
    for optional in ("train_time", "progress"):  # (progress: checkpoints written before it was saved)
        load_checkpoint(_save({k: v for k, v in trained.items() if k != optional}, tmp_path))
    older = copy.deepcopy(trained)
    for progress in older["progress"].values():
        del progress["learned"]  # (checkpoints written before it was saved)
    load_checkpoint(_save(older, tmp_path))
    # What a CUDA machine writes: one generator state per device.
    with_cuda = {**trained, "rng": {**trained["rng"], "cuda": [torch.zeros(16, dtype=torch.uint8)]}}
    load_checkpoint(_save(with_cuda, tmp_path))


def test_valid_checkpoint_resumes_into_a_fresh_engine(trained, tmp_path):
    path = _save(trained, tmp_path)
    engine = tiny_engine(tmp_path / "resumed")
    with torch.random.fork_rng():
        engine.load_state_dict(load_checkpoint(path), str(path))
        assert torch.equal(torch.get_rng_state(), trained["rng"]["torch"])
    assert engine.global_step == 2
    for problem in engine.problems:
        saved = trained["levels"][problem.name]
        assert all(torch.equal(value, saved[key]) for key, value in snapshot(problem.module).items())
        assert len(problem.optimizer.state) == len(trained["optimizers"][problem.name]["state"]) > 0
        if problem.stream is not None:
            assert problem.stream.state_dict() == trained["streams"][problem.name]


_DROP = object()


def _set(dotted: str, value):
    """A mutation putting ``value`` at ``dotted`` (a missing key when value is _DROP)."""

    def mutate(state):
        *parents, last = dotted.split(".")
        for key in parents:
            state = state[key]
        if value is _DROP:
            del state[last]
        else:
            state[last] = value

    return mutate


def _poison(state):
    state["levels"]["autoencoder"]["encoder.net.0.weight"][0, 0, 0, 0] = float("nan")
    state["optimizers"]["codebook"]["state"][0]["exp_avg"][0, 0] = float("inf")


INVALID = {
    "missing rng": (_set("rng", _DROP), "'rng' is missing"),
    "levels an int": (_set("levels", 1), "'levels' is 1, not a dict"),
    "levels a list": (_set("levels", [torch.zeros(2)]), "'levels' is a list, not a dict"),
    "level not a dict": (_set("levels.codebook", torch.zeros(2)), "'levels.codebook' is a torch.float32 tensor, not a dict"),
    "level name not str": (lambda s: s["levels"].update({3: {}}), "'levels' has key 3, not a level name"),
    "parameter not a tensor": (_set("levels.codebook.codebook", [[0.0]]), "'levels.codebook.codebook' is a list, not a tensor"),
    "optimizer a str": (_set("optimizers.codebook", "adam"), "'optimizers.codebook' is 'adam', not a dict"),
    "optimizer without groups": (_set("optimizers.codebook.param_groups", _DROP), "'optimizers.codebook.param_groups' is missing"),
    "optimizer state a list": (_set("optimizers.codebook.state", []), "'optimizers.codebook.state' is a list, not a dict"),
    "schedulers a list": (_set("schedulers", []), "'schedulers' is a list, not a dict"),
    "stream without position": (_set("streams.autoencoder.position", _DROP), "'streams.autoencoder.position' is missing"),
    "stream position negative": (_set("streams.autoencoder.position", -1), "'streams.autoencoder.position' is -1, not a"),
    "step a str": (_set("step", "3"), "'step' is '3', not a non-negative integer"),
    "step a bool": (_set("step", True), "'step' is True, not a non-negative integer"),
    "step a float": (_set("step", 2.0), "'step' is 2.0, not a non-negative integer"),
    "progress count negative": (_set("progress.codebook.count", -1), "'progress.codebook.count' is -1, not a"),
    "progress grads a tensor": (_set("progress.autoencoder.grads", torch.zeros(2)),
                                "'progress.autoencoder.grads' is a torch.float32 tensor, not a list"),
    "progress grad a str": (_set("progress.autoencoder.grads", ["g"]), "'progress.autoencoder.grads.0' is 'g', not a tensor"),
    "progress terms a list": (_set("progress.codebook.hypergradient_terms", []),
                              "'progress.codebook.hypergradient_terms' is a list, not a dict"),
    "progress stats a list": (_set("progress.codebook.last_stats", []), "'progress.codebook.last_stats' is a list, not a dict"),
    "progress learned a str": (_set("progress.codebook.learned", "beta"),
                               "'progress.codebook.learned' is 'beta', not a list of names"),
    "train_time nan": (_set("train_time", float("nan")), "'train_time' is nan, not a finite number"),
    "train_time a str": (_set("train_time", "1.5"), "'train_time' is '1.5', not a finite number"),
    "rng empty": (_set("rng", {}), "'rng.torch' is missing"),
    "rng a tensor": (_set("rng", torch.zeros(3, dtype=torch.uint8)), "'rng' is a torch.uint8 tensor, not a dict"),
    "rng float": (_set("rng.torch", torch.zeros(5056)), "'rng.torch' is a torch.float32 tensor, not a torch.uint8"),
    "rng wrong size": (_set("rng.torch", torch.zeros(100, dtype=torch.uint8)), "'rng.torch' is not a CPU generator state"),
    "cuda rng a tensor": (_set("rng.cuda", torch.zeros(3, dtype=torch.uint8)), "'rng.cuda' is a torch.uint8 tensor, not a list"),
    "cuda rng float": (_set("rng.cuda", [torch.zeros(3)]), "'rng.cuda.0' is a torch.float32 tensor, not a torch.uint8"),
    "non-finite": (_poison, "'levels.autoencoder.encoder.net.0.weight' holds NaN or infinite values (and 1 more); it cannot be resumed"),
}


@pytest.mark.parametrize("mutate, expected", INVALID.values(), ids=INVALID.keys())
def test_invalid_checkpoint_is_one_line(trained, tmp_path, mutate, expected):
    state = copy.deepcopy(trained)
    mutate(state)
    path = _save(state, tmp_path)
    with pytest.raises(UserError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"--resume: {path} is not a valid checkpoint: "), message
    assert expected in message, message


def test_not_a_dict_at_all(tmp_path):
    path = _save([1, 2], tmp_path)
    with pytest.raises(UserError, match=r"is not a valid checkpoint: it holds a list, not a dict$"):
        load_checkpoint(path)


@pytest.mark.parametrize("why", ["--resume", "prior.run"])
@pytest.mark.parametrize("level, module", [("codebook", "affine"), ("vqvae", "quantizer.affine")])
def test_learned_affine_as_scale_and_bias_is_refused_in_one_line(trained, tmp_path, why, level, module):
    # A learned affine map saved before Huh A.1's parameterization, in a codebook level or a VQ-VAE level: parameters
    # scale (1 at the start) and bias, written by hand. Read as s and t they would be another map, so neither a
    # resume nor a prior takes them.
    state = copy.deepcopy(trained)
    state["levels"].setdefault(level, {}).update({f"{module}.scale": torch.ones(1, 4), f"{module}.bias": torch.zeros(1, 4)})
    path = _save(state, tmp_path)
    with pytest.raises(UserError) as error:
        load_checkpoint(path, why)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{why}: {path} holds a learned affine map as scale and bias ('levels.{level}.{module}.scale')")
    assert "predates Huh A.1's parameterization" in message and message.endswith("it cannot be resumed or loaded")


def test_run_py_refuses_to_resume_it_in_one_line(trained, tmp_path, capsys):
    import run

    state = copy.deepcopy(trained)
    state["levels"]["codebook"].update({"affine.scale": torch.ones(1, 4), "affine.bias": torch.zeros(1, 4)})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _save(state, run_dir)
    config = ROOT / "configs/digits/affine.yaml"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(config))))  # resolved, as a run writes it
    assert run.main([str(config), "--resume", str(run_dir)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --resume: ") and "predates Huh A.1" in err, err
    assert (run_dir / "checkpoint.pt").is_file()  # nothing already written is lost


def test_learned_affine_checkpoints_of_this_version_load(tmp_path):
    # The refusal above keys on the old names only: today's learned map (s, t), the EMA map's statistics, and a
    # layer that happens to be called affine (a weight and a bias) load.
    learned = tiny_engine(tmp_path / "learned", quantizer={"affine": "learned"}).state_dict()
    assert {"affine.s", "affine.t"} <= set(learned["levels"]["codebook"])
    load_checkpoint(_save(learned, tmp_path))
    ema = tiny_engine(tmp_path / "ema", quantizer={"affine": "ema"}).state_dict()
    ema["levels"]["autoencoder"].update({"decoder.affine.weight": torch.ones(2, 2), "decoder.affine.bias": torch.zeros(2)})
    load_checkpoint(_save(ema, tmp_path))
