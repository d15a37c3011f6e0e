"""Every recipe parses through the CLI and trains for two steps (only batch size and lengths overridden);
bad configs give one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmgen
from mmgen.config import ConfigError, cli_main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
SMALL = ["--data.batch_size", "2", "--model.block_size", "16", "--data.val_batches", "1", "--model.sample_tokens",
         "8", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]


def test_recipes_exist() -> None:
    assert {p.name for p in RECIPES} >= {"shakespeare_char.yaml", "shakespeare_char_cpu.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_runs_two_steps(recipe: Path, tmp_path, capsys) -> None:
    first = recipe.read_text().splitlines()[:3]
    assert any(f"mmgen fit --config {recipe.relative_to(ROOT)}" in line for line in first), "command on top"
    cli = cli_main(["fit", "--config", str(recipe), *SMALL, "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 2
    last = next(tmp_path.rglob("last.ckpt"))
    model = mmgen.load(last)
    assert model.block_size == 16 and len(model.generate("\n", 5, seed=0)) == 5
    assert "[samples @ step 2]" in capsys.readouterr().out  # generated text shown at validation


def test_print_config_shows_plugin_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "recipes/text/shakespeare_char_cpu.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "class_path: mmgen_text.CharTokenizer" in out and "unknown: error" in out


def test_override_at_depth(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "recipes/text/shakespeare_char_cpu.yaml"), "--model.num_layers", "7",
                  "--data.tokenizer.unknown", "unk", "--print_config"])
    out = capsys.readouterr().out
    assert "num_layers: 7" in out and "unknown: unk" in out


def test_misspelt_key_is_one_line_with_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        cli_main(["fit", "--config", str(ROOT / "recipes/text/shakespeare_char_cpu.yaml"), "--model.num_layerz", "3"])
    msg = str(err.value)
    assert "\n" not in msg and "'num_layerz'" in msg and "did you mean 'num_layers'" in msg


def test_unknown_plugin_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        cli_main(["fit", "--config", str(ROOT / "recipes/text/shakespeare_char_cpu.yaml"),
                  "--data.tokenizer.class_path", "CharTokeniser"])
    msg = str(err.value)
    assert "\n" not in msg and "unknown class 'CharTokeniser'" in msg and "CharTokenizer (plugin 'text'" in msg


def test_generate_command_streams_and_bad_checkpoint_is_one_line(tmp_path) -> None:
    cli_main(["fit", "--config", str(ROOT / "recipes/text/shakespeare_char_cpu.yaml"), *SMALL,
              "--trainer.default_root_dir", str(tmp_path)])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    out = subprocess.run([sys.executable, "-m", "mmgen", "generate", "--ckpt", str(ckpt), "--prompt", "ROMEO:",
                          "--max-new-tokens", "20", "--seed", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model = mmgen.load(ckpt)
    torch.manual_seed(0)
    assert out.stdout.startswith("ROMEO:") and "20 tokens in" in out.stderr
    assert out.stdout[len("ROMEO:"):].rstrip("\n") == model.generate("ROMEO:", 20, temperature=0.8, seed=0)
    bad = subprocess.run([sys.executable, "-m", "mmgen", "generate", "--ckpt", str(tmp_path / "missing.ckpt")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "checkpoint not found" in bad.stderr


def test_bad_data_during_a_run_is_one_line(tmp_path) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    for path, expected in [(tmp_path / "missing.txt", "data not found"), (latin1, "not UTF-8 text")]:
        out = subprocess.run([sys.executable, "-m", "mmgen", "fit", "--config",
                              str(ROOT / "recipes/text/shakespeare_char_cpu.yaml"), "--data.path", str(path),
                              "--trainer.default_root_dir", str(tmp_path)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and expected in out.stderr
        assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith("mmgen: error:")
