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
RECIPES = sorted((ROOT / "recipes" / "text").glob("*.yaml"))  # speech recipes: tests/speech/test_speech_recipes.py
SMALL = ["--data.batch_size", "2", "--model.block_size", "16", "--data.val_batches", "1", "--data.val_batch_size", "2",
         "--model.sample_tokens", "8", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]


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


# ---------------------------------------------------------------- one-line errors, tools and subcommands

RECIPE = str(ROOT / "recipes/text/shakespeare_char_cpu.yaml")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of the CPU recipe trained for two steps (SMALL), shared by the tests below."""
    root = tmp_path_factory.mktemp("small_run")
    cli_main(["fit", "--config", RECIPE, *SMALL, "--trainer.default_root_dir", str(root)])
    return next(root.rglob("last.ckpt"))


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    from mmgen.cli import main

    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_misspelt_plugin_option_blames_the_plugin(where, tmp_path) -> None:
    if where == "command line":
        args = ["--config", RECIPE, "--data.init_args.tokenizer.init_args.unknwn", "error"]
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(Path(RECIPE).read_text().replace(
            "      class_path: CharTokenizer\n", "      class_path: CharTokenizer\n      init_args:\n        unknwn: error\n"))
        args = ["--config", str(recipe)]
    with pytest.raises(ConfigError) as err:
        cli_main(["fit", *args])
    assert str(err.value) == ("data.tokenizer: CharTokenizer has no option 'unknwn' (did you mean 'unknown'?); "
                              "accepted: unknown")


@pytest.mark.parametrize("option, value, expected", [
    ("--model.init_args.num_layers", "eight", "model.num_layers: expected int, got 'eight'"),
    ("--model.sample_top_k", "abc", "model.sample_top_k: expected int or null, got 'abc'"),
    ("--data.tokenizer.unknown", "maybe", "data.tokenizer.unknown: expected one of 'error', 'unk', got 'maybe'"),
    ("--trainer.max_steps", "1.5", "trainer.max_steps: expected int, got '1.5'"),
])
def test_wrong_value_type_is_one_line_naming_key_value_and_type(option, value, expected) -> None:
    with pytest.raises(ConfigError) as err:
        cli_main(["fit", "--config", RECIPE, option, value])
    assert str(err.value) == expected


def test_option_prefix_is_an_error_not_an_abbreviation() -> None:
    with pytest.raises(ConfigError) as err:
        cli_main(["fit", "--config", RECIPE, "--trainer.max_step", "5", "--print_config"])
    assert str(err.value) == "unrecognized arguments: --trainer.max_step 5 (did you mean '--trainer.max_steps'?)"
    with pytest.raises(ConfigError, match="unrecognized arguments: --conf"):
        cli_main(["fit", "--conf", RECIPE, "--print_config"])


def test_argument_rejected_by_init_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        cli_main(["fit", "--config", RECIPE, "--data.val_fraction", "2"])
    assert str(err.value) == "TextDataModule: val_fraction=2.0; accepted: a number between 0 and 1"


def test_init_from_errors_are_the_checkpoint_error(small_ckpt, tmp_path, capsys) -> None:
    from mmgen.checkpoint import CheckpointError

    missing = tmp_path / "missing.ckpt"
    with pytest.raises(CheckpointError) as err:
        cli_main(["fit", "--config", RECIPE, *SMALL, "--model.init_from", str(missing)])
    assert str(err.value) == f"checkpoint not found: {missing}"
    status, _, stderr = run_main(["fit", "--config", RECIPE, *SMALL, "--model.init_from", str(missing)], capsys)
    assert status == 2 and stderr.strip().splitlines()[-1] == f"mmgen: error: checkpoint not found: {missing}"
    assert "Does not validate" not in stderr and "Traceback" not in stderr
    # another architecture than the checkpoint's (SMALL trained block_size 16)
    with pytest.raises(CheckpointError) as err:
        cli_main(["fit", "--config", RECIPE, *SMALL, "--model.init_from", str(small_ckpt), "--model.d_model", "64"])
    msg = str(err.value)
    assert msg.startswith(f"init_from {small_ckpt}: its weights do not fit this model; use the checkpoint's "
                          f"architecture settings (") and "\n" not in msg and "Union" not in msg


def test_help_lists_lightning_subcommands_and_mmgen_tools(monkeypatch, capsys) -> None:
    from mmgen import cli

    def _transcribe(argv: list[str]) -> int:
        """Transcribe speech with a speech-recognition checkpoint."""
        return 0

    monkeypatch.setitem(cli.TOOLS, "transcribe", _transcribe)  # a tool added later shows up the same way
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,predict,plugins,generate,transcribe}" in out
    text = " ".join(out.split())  # help wraps long lines
    assert "fit Runs the full optimization routine." in text
    assert "plugins List the installed mmgen plugins and the modality names they register." in text
    assert "generate Generate text from a language-model checkpoint." in text
    assert "transcribe Transcribe speech with a speech-recognition checkpoint." in text
    status, out, _ = run_main(["plugins"], capsys)  # the tool itself still runs through main
    assert status == 0 and "text: mmgen" in out


def test_test_subcommand_logs_test_loss_on_the_validation_windows(small_ckpt, tmp_path) -> None:
    args = ["--config", RECIPE, *SMALL, "--model.sample_tokens", "0", "--ckpt_path", str(small_ckpt),
            "--trainer.default_root_dir", str(tmp_path)]
    tested = cli_main(["test", *args])
    validated = cli_main(["validate", *args])
    test_loss = tested.trainer.callback_metrics["test_loss"].item()
    assert test_loss == validated.trainer.callback_metrics["val_loss"].item()  # the same fixed windows
    assert 0 < test_loss < 10


def test_predict_is_refused_in_one_line(capsys) -> None:
    status, _, stderr = run_main(["predict", "--config", RECIPE], capsys)
    assert status == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("mmgen: error: predict: LanguageModel does not support this subcommand "
                                               "(it defines no predict_step()); it supports: fit, validate, test")


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluating_on_another_vocabulary_says_cannot_evaluate(subcommand, small_ckpt, tmp_path, capsys) -> None:
    other = tmp_path / "other.txt"
    other.write_text("Zounds! Quoth Xerxes, 42 times.\n" * 200)
    status, _, stderr = run_main([subcommand, "--config", RECIPE, *SMALL, "--ckpt_path", str(small_ckpt),
                                  "--data.path", str(other), "--trainer.default_root_dir", str(tmp_path)], capsys)
    last = stderr.strip().splitlines()[-1]
    assert status == 2 and "Traceback" not in stderr
    assert last.startswith("mmgen: error: cannot evaluate the checkpoint on this data: the checkpoint's vocabulary "
                           "differs from the one built from this data (65 vs ")
    assert f"to {subcommand} it on other text" in last and "`--model.init_from CKPT`" in last and "resume" not in last


def test_generate_unknown_option_and_prompt_checked_before_output(small_ckpt, capsys) -> None:
    base = ["generate", "--ckpt", str(small_ckpt), "--max-new-tokens", "5", "--seed", "0"]
    status, out, err = run_main([*base, "--prompt", "Ωmega"], capsys)
    assert status == 2 and out == ""  # nothing written before the error
    assert err == ("mmgen generate: error: prompt: text has 1 character(s) outside the vocabulary of 69 ids "
                   "(65 characters): 'Ω'; pass `--unknown unk` to map them to <unk>\n")
    status, out, err = run_main([*base, "--prompt", "Ωmega", "--unknown", "unk"], capsys)
    assert status == 0 and out.startswith("Ωmega") and "[5 tokens in" in err
    status, out, err = run_main([*base, "--temperature", "-1"], capsys)
    assert status == 2 and out == "" and err == "mmgen generate: error: temperature=-1.0; accepted: >= 0 (0 is greedy)\n"
    with pytest.raises(SystemExit):
        run_main([*base, "--unknown", "maybe"], capsys)
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
