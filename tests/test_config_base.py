"""Config inheritance (``base: FILE``) and the shipped defaults: the digits configs share configs/digits/base.yaml,
whose values are also the dataclass defaults, so a partial config without a base behaves like a shipped one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import problems  # noqa: F401  (registers the level kinds the configs name)
import run
from mqvae.config import Config, LevelConfig, load_config, read_config, read_yaml, to_dict
from mqvae.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_base_chain_is_merged_key_by_key_and_lists_are_replaced(tmp_path):
    write(tmp_path / "common" / "root.yaml", {
        "seed": 3, "quantizer": {"num_codes": 32, "dim": 8, "beta": 0.3},
        "levels": [{"name": "codebook", "problem": "Codebook", "lower": ["autoencoder"]},
                   {"name": "autoencoder", "problem": "AutoEncoder"}],
        "train": {"iters": 9, "log_every": 3}})
    write(tmp_path / "common" / "middle.yaml", {"base": "root.yaml", "quantizer": {"dim": 4}, "train": {"iters": 7}})
    # Relative to the file's own folder, not to the working directory.
    child = write(tmp_path / "exp" / "child.yaml", {"base": "../common/middle.yaml", "quantizer": {"beta": 0.2},
                                                    "levels": [{"name": "vqvae", "problem": "VQVAE"}]})
    data = read_config(child)
    assert "base" not in data
    assert data["seed"] == 3
    assert data["quantizer"] == {"num_codes": 32, "dim": 4, "beta": 0.2}  # each file overrides only its keys
    assert data["train"] == {"iters": 7, "log_every": 3}
    assert data["levels"] == [{"name": "vqvae", "problem": "VQVAE"}]  # a list is replaced whole
    cfg = load_config(child, ["train.iters=5"])  # --set applies after the chain
    assert (cfg.train.iters, cfg.quantizer.dim, [level.name for level in cfg.levels]) == (5, 4, ["vqvae"])


@pytest.mark.parametrize("layout, needle", [
    ({"a.yaml": {"base": "a.yaml"}}, "makes a cycle"),
    ({"a.yaml": {"base": "b.yaml"}, "b.yaml": {"base": "c.yaml"}, "c.yaml": {"base": "a.yaml"}}, "makes a cycle"),
    ({"a.yaml": {"base": "missing.yaml"}}, "not found"),
    ({"a.yaml": {"base": 3}}, "expected the path of a config file"),
    ({"a.yaml": {"base": ""}}, "expected the path of a config file"),
])
def test_a_bad_base_is_one_line(tmp_path, layout, needle):
    for name, data in layout.items():
        write(tmp_path / name, data)
    with pytest.raises(UserError) as caught:
        load_config(tmp_path / "a.yaml")
    message = str(caught.value)
    assert needle in message and "\n" not in message and message.startswith(str(tmp_path))
    if "cycle" in needle:
        assert message.endswith(f"({' -> '.join([*layout, 'a.yaml'])})")


def test_a_bad_base_on_the_command_line_exits_with_one_line(tmp_path, capsys):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    assert run.main([str(tmp_path / "a.yaml"), "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err.strip()
    assert "makes a cycle" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def flat(data, prefix=""):
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def test_the_digits_base_holds_the_dataclass_defaults():
    # Every value the base sets is the default of its dataclass field, so a partial config behaves like the
    # shipped ones; and the level defaults its comment names are LevelConfig's.
    base = flat(read_yaml(DIGITS / "base.yaml"))
    defaults = flat(to_dict(Config(levels=[])))
    assert base and {key: defaults[key] for key in base} == base
    text = (DIGITS / "base.yaml").read_text()
    for key in ("optimizer", "lr", "weight_decay", "scheduler", "min_lr"):
        default = LevelConfig.__dataclass_fields__[key].default
        shown = f"{default:.1e}".replace("e-0", "e-") if isinstance(default, float) and default else default
        assert f"{key}: {shown}" in text, key


def test_a_partial_config_without_a_base_resolves_like_the_shipped_one(tmp_path):
    partial = write(tmp_path / "mine.yaml", {"levels": [{"name": "vqvae", "problem": "VQVAE"}]})
    assert to_dict(load_config(partial)) == to_dict(load_config(DIGITS / "vqvae.yaml"))
    partial = write(tmp_path / "mq.yaml", {"levels": [
        {"name": "codebook", "problem": "Codebook", "lower": ["autoencoder"]},
        {"name": "autoencoder", "problem": "AutoEncoder"}]})
    assert to_dict(load_config(partial)) == to_dict(load_config(DIGITS / "mqvae.yaml"))


def base_chain(path: Path) -> list[Path]:
    chain = []
    while "base" in (data := read_yaml(path)):
        path = (path.parent / data["base"]).resolve()
        chain.append(path)
    return chain


def test_every_digits_experiment_inherits_the_one_shared_base():
    experiments = [p for p in sorted(DIGITS.glob("*.yaml")) if not p.name.endswith("base.yaml")]
    assert len(experiments) > 15
    for path in experiments:
        assert base_chain(path)[-1] == (DIGITS / "base.yaml").resolve(), path.name
        text = path.read_text()
        # A method's file states only what it changes: the shared sections live in the base (another network kind
        # states its network: the classifier's, and the VQ-GAN's of vqgan.yaml, which mqgan.yaml inherits).
        assert "\nmodel:" not in text or read_config(path)["model"]["kind"] in ("resnet18", "vqgan"), path.name


def test_the_run_folder_keeps_the_resolved_config_without_its_base(tmp_path):
    config = write(tmp_path / "exp.yaml", {"base": str(DIGITS / "vqvae.yaml"), "train": {"iters": 2}})
    out = tmp_path / "run"
    assert run.main([str(config), "--set", "model.hidden_channels=8", "--set", "model.res_channels=4",
                     "--set", "quantizer.kmeans_warmup=2", "--set", "eval.image_quality=off", "--set", "device=cpu",
                     "--out", str(out)]) == 0
    saved = read_yaml(out / "config.yaml")
    assert "base" not in saved and saved["train"]["iters"] == 2 and saved["levels"][0]["name"] == "vqvae"
    assert run.main(["--resume", str(out), "--set", "train.iters=3"]) == 0
