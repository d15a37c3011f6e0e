"""The plugin manager and catalogue (mmgen.plugins), the ``mmgen plugins`` command, and real entry-point plugins.

In-process tests register fake plugins with ``plugins.plugin_manager().register``; the ``clean_plugins`` fixture resets
the plugin manager before and after each test so nothing leaks. The distribution tests build real throwaway
distributions with pip (``--target`` a temporary directory) and run mmgen in a subprocess with it on PYTHONPATH.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmgen import plugins
from mmgen.hookspecs import hookimpl
from mmgen.modality import Modality, TextModality
from mmgen_text import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = REPO / "plugins" / "example_bytes"
MMGEN_VERSION = md.version("mmgen")


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(autouse=True)
def clean_plugins(monkeypatch):
    """A fresh plugin manager for each test, and no MMGEN_PLUGINS restriction unless the test sets one."""
    monkeypatch.delenv(plugins.ENV_RESTRICT, raising=False)
    plugins.reset()
    yield
    plugins.reset()


def make_modality(name: str) -> type:
    """A distinct TextModality subclass called ``name`` (registration only checks the class, never instantiates it)."""
    return type(name, (TextModality,), {"__module__": __name__})


class FakePlugin:
    """An in-process plugin registering the given classes (and raising ``error`` afterwards, if one is given)."""

    def __init__(self, *classes: type, error: Exception | None = None) -> None:
        self.classes = classes
        self.error = error

    @hookimpl
    def mmgen_register_modalities(self, register):
        for cls in self.classes:
            register(cls)
        if self.error is not None:
            raise self.error


def register(plugin: object, name: str) -> object:
    plugins.plugin_manager().register(plugin, name=name)
    return plugin


def subprocess_env(*site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != plugins.ENV_RESTRICT}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, site), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_python(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def pip_install_target(target: Path, *sources: Path) -> None:
    """Build and install distributions into ``target`` like a user would, but offline and with the venv's setuptools."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--no-input", "-q", "--target", str(target), *map(str, sources)],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"


def write_distribution(root: Path, dist: str, plugin: str, module: str, code: str) -> Path:
    """A throwaway plugin distribution: pyproject.toml (entry point ``plugin = module``) and ``module/__init__.py``."""
    (root / module).mkdir(parents=True)
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"

        [project.entry-points.mmgen]
        {plugin} = "{module}"

        [tool.setuptools]
        packages = ["{module}"]
        """))
    (root / module / "__init__.py").write_text(textwrap.dedent(code))
    return root


# ---------------------------------------------------------------- the built-in plugin, through its real entry point

def test_builtin_text_plugin_loads_through_entry_point():
    catalogue = plugins.modalities()
    reg = catalogue["CharTokenizer"]
    assert reg.cls is CharTokenizer
    assert reg.plugin == "text"
    assert reg.distribution == "mmgen"
    assert reg.version == MMGEN_VERSION
    assert reg.owner() == f"plugin 'text' (mmgen {MMGEN_VERSION})"
    assert plugins.get_modality("CharTokenizer") is CharTokenizer
    assert plugins.registration_of(CharTokenizer) == reg
    info = {row["plugin"]: row for row in plugins.plugin_info()}
    assert info["text"] == {"plugin": "text", "distribution": "mmgen", "version": MMGEN_VERSION,
                            "modalities": ["CharTokenizer"], "error": None}


# ---------------------------------------------------------------- in-process plugins

def test_in_process_plugins_add_names_and_are_gone_after_reset():
    audio, image = make_modality("FakeAudio"), make_modality("FakeImage")
    register(FakePlugin(audio), "fake-audio")
    register(FakePlugin(image), "fake-image")
    catalogue = plugins.modalities()
    assert {"CharTokenizer", "FakeAudio", "FakeImage"} <= set(catalogue)
    assert catalogue["FakeAudio"].cls is audio and catalogue["FakeAudio"].plugin == "fake-audio"
    assert catalogue["FakeImage"].plugin == "fake-image"
    assert catalogue["FakeImage"].distribution is None and catalogue["FakeImage"].version is None
    assert "not installed as a distribution" in catalogue["FakeImage"].owner()
    assert plugins.get_modality("FakeAudio") is audio
    rows = {row["plugin"]: row for row in plugins.plugin_info()}
    assert rows["fake-audio"]["modalities"] == ["FakeAudio"] and rows["fake-audio"]["distribution"] is None

    plugins.plugin_manager().unregister(name="fake-audio")
    assert "FakeAudio" not in plugins.modalities()  # the catalogue is rebuilt from the manager on every call

    plugins.reset()
    assert "CharTokenizer" in plugins.modalities()
    assert not {"FakeAudio", "FakeImage"} & set(plugins.modalities())


def test_state_does_not_leak_between_tests():
    # runs after the test above registered fake plugins; the autouse fixture reset the manager in between
    assert not {"FakeAudio", "FakeImage"} & set(plugins.modalities())
    assert not {"fake-audio", "fake-image"} & {row["plugin"] for row in plugins.plugin_info()}


def test_in_process_plugin_registered_before_loading_keeps_entry_points():
    # registering first, then loading: the entry points still load, and the in-process plugin stays
    register(FakePlugin(make_modality("Early")), "early")
    assert {"CharTokenizer", "Early"} <= set(plugins.modalities())


def test_same_plugin_registering_its_class_twice_is_fine():
    cls = make_modality("Twice")
    register(FakePlugin(cls, cls), "twice")
    assert plugins.modalities()["Twice"].cls is cls


def test_two_plugins_registering_one_name_is_an_error_naming_both():
    register(FakePlugin(make_modality("Clash")), "first-plugin")
    register(FakePlugin(make_modality("Clash")), "second-plugin")
    with pytest.raises(plugins.PluginError) as info:
        plugins.modalities()
    message = str(info.value)
    assert "'Clash'" in message
    assert "'first-plugin'" in message and "'second-plugin'" in message
    assert plugins.ENV_RESTRICT in message
    with pytest.raises(plugins.PluginError, match="first-plugin"):
        plugins.get_modality("Clash")


def test_clash_with_builtin_name_names_the_builtin_distribution():
    register(FakePlugin(make_modality("CharTokenizer")), "impostor")
    with pytest.raises(plugins.PluginError) as info:
        plugins.modalities()
    message = str(info.value)
    assert f"plugin 'text' (mmgen {MMGEN_VERSION})" in message
    assert "plugin 'impostor' (not installed as a distribution)" in message


def test_plugin_whose_hook_raises_is_reported_and_others_still_load(capsys):
    register(FakePlugin(error=RuntimeError("kaboom")), "exploding")
    register(FakePlugin(make_modality("Healthy")), "healthy")
    catalogue = plugins.modalities()
    assert {"CharTokenizer", "Healthy"} <= set(catalogue)
    err = capsys.readouterr().err
    assert "'exploding'" in err and "RuntimeError: kaboom" in err
    rows = {row["plugin"]: row for row in plugins.plugin_info()}
    assert "kaboom" in rows["exploding"]["error"] and rows["exploding"]["modalities"] == []
    assert rows["text"]["error"] is None and rows["healthy"]["error"] is None
    # reported once, not on every rebuild of the catalogue
    plugins.modalities()
    assert "kaboom" not in capsys.readouterr().err
    # and an unknown-name error mentions the failure, as a hint
    with pytest.raises(plugins.PluginError, match="'exploding' failed"):
        plugins.get_modality("Missing")


def test_registering_a_non_modality_is_reported():
    class NotAModality:
        pass

    register(FakePlugin(NotAModality), "sloppy")
    assert "CharTokenizer" in plugins.modalities()
    rows = {row["plugin"]: row for row in plugins.plugin_info()}
    assert "not a subclass of mmgen.Modality" in rows["sloppy"]["error"]
    assert issubclass(CharTokenizer, Modality)


def test_unknown_name_lists_known_names_and_their_plugins():
    register(FakePlugin(make_modality("Other")), "other-plugin")
    with pytest.raises(plugins.PluginError) as info:
        plugins.get_modality("Nope")
    message = str(info.value)
    assert "unknown modality 'Nope'" in message
    assert f"CharTokenizer (plugin 'text' (mmgen {MMGEN_VERSION}))" in message
    assert "Other (plugin 'other-plugin' (not installed as a distribution))" in message
    assert isinstance(info.value, LookupError)


def test_unknown_name_with_no_plugins_says_so(monkeypatch):
    monkeypatch.setenv(plugins.ENV_RESTRICT, "")
    with pytest.raises(plugins.PluginError, match="no mmgen plugin is installed"):
        plugins.get_modality("CharTokenizer")


# ---------------------------------------------------------------- MMGEN_PLUGINS and loading once

@pytest.mark.parametrize("restrict", ["some-other-plugin", "nothing, other", ""])
def test_restriction_excluding_text_leaves_char_tokenizer_out(monkeypatch, restrict):
    monkeypatch.setenv(plugins.ENV_RESTRICT, restrict)
    assert "CharTokenizer" not in plugins.modalities()
    assert plugins.plugin_info() == []


@pytest.mark.parametrize("restrict", ["text", "mmgen", " other , text "])
def test_restriction_including_text_by_entry_point_or_distribution(monkeypatch, restrict):
    monkeypatch.setenv(plugins.ENV_RESTRICT, restrict)
    assert plugins.modalities()["CharTokenizer"].plugin == "text"


def test_restriction_does_not_drop_in_process_plugins(monkeypatch):
    monkeypatch.setenv(plugins.ENV_RESTRICT, "nothing")
    register(FakePlugin(make_modality("Local")), "local")
    assert set(plugins.modalities()) == {"Local"}


def test_load_plugins_is_idempotent(monkeypatch):
    calls = []
    real_entry_points = plugins.md.entry_points

    def counting_entry_points(**kwargs):
        calls.append(kwargs)
        return real_entry_points(**kwargs)

    monkeypatch.setattr(plugins.md, "entry_points", counting_entry_points)
    pm = plugins.load_plugins()
    text_plugin = pm.get_plugin("text")
    assert text_plugin is not None
    assert plugins.load_plugins() is pm
    plugins.modalities()
    plugins.plugin_info()
    plugins.get_modality("CharTokenizer")
    assert calls == [{"group": "mmgen"}]
    names = [name for name, _ in pm.list_name_plugin()]
    assert "text" in names and len(names) == len(set(names))
    assert pm.get_plugin("text") is text_plugin

    plugins.reset()  # a reset forgets the manager, so the next call loads again
    assert plugins.load_plugins() is not pm
    assert len(calls) == 2


# ---------------------------------------------------------------- real distributions, installed with pip

@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """plugins/example_bytes built and installed (pip --target) into a throwaway site directory."""
    tmp = tmp_path_factory.mktemp("example_bytes")
    source = tmp / "src"  # build from a copy, so pip's in-tree build/ and *.egg-info stay out of the repository
    shutil.copytree(EXAMPLE_PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    pip_install_target(site, source)
    assert (site / "mmgen_bytes" / "__init__.py").is_file()
    return site


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """Two broken plugin distributions in one site directory: one fails to import, one implements a hook this mmgen
    does not define (a plugin written for a newer mmgen)."""
    tmp = tmp_path_factory.mktemp("broken")
    import_error = write_distribution(tmp / "import_error", "mmgen-broken-import", "broken", "mmgen_broken_import", """\
        raise ImportError("mmgen_broken_import needs a library that is not installed")
        """)
    future_hook = write_distribution(tmp / "future_hook", "mmgen-future-hook", "future", "mmgen_future_hook", """\
        from mmgen.hookspecs import hookimpl
        from mmgen.modality import TextModality


        class FutureTokenizer(TextModality):
            pass


        @hookimpl
        def mmgen_register_modalities(register):
            register(FutureTokenizer)


        @hookimpl
        def mmgen_register_something_new(register):
            pass
        """)
    site = tmp / "site"
    pip_install_target(site, import_error, future_hook)
    return site


EXAMPLE_CHECK = """\
import json
import os
from mmgen import plugins

info = plugins.plugin_info()
print(json.dumps(info))
ByteTokenizer = plugins.get_modality("ByteTokenizer")
tok = ByteTokenizer()
ids = tok.encode("héllo")
assert ids.tolist() == [4 + b for b in "héllo".encode("utf-8")], ids
assert tok.decode(ids) == "héllo"
assert tok.fitted and tok.spec.vocab_size == 260 and tok.init_args() == {}
print("ROUND TRIP OK")
os.environ[plugins.ENV_RESTRICT] = "mmgen-example-bytes"  # a third-party distribution name restricts loading too
plugins.reset()
print(json.dumps(plugins.plugin_info()))
"""


def test_example_plugin_distribution_through_real_entry_point(example_site, tmp_path):
    env = subprocess_env(example_site)
    result = run_python(["-c", EXAMPLE_CHECK], env, tmp_path)
    assert result.returncode == 0, result.stderr
    out_lines = result.stdout.splitlines()
    assert out_lines[1] == "ROUND TRIP OK"
    info = {row["plugin"]: row for row in json.loads(out_lines[0])}
    bytes_row = {"plugin": "bytes", "distribution": "mmgen-example-bytes", "version": "0.1.0",
                 "modalities": ["ByteTokenizer"], "error": None}
    assert info["bytes"] == bytes_row
    assert info["text"]["modalities"] == ["CharTokenizer"] and info["text"]["distribution"] == "mmgen"
    assert result.stderr.strip() == ""
    assert json.loads(out_lines[2]) == [bytes_row]  # restricted to the example distribution

    cli = run_python(["-m", "mmgen", "plugins"], env, tmp_path)
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.splitlines()
    assert "bytes: mmgen-example-bytes 0.1.0; modalities: ByteTokenizer" in lines
    assert f"text: mmgen {MMGEN_VERSION}; modalities: CharTokenizer" in lines
    assert "ERROR" not in cli.stdout and "mmgen: plugin" not in cli.stderr


def test_broken_plugin_distributions_are_reported_and_others_still_list(broken_site, tmp_path):
    cli = run_python(["-m", "mmgen", "plugins"], subprocess_env(broken_site), tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "Traceback" not in cli.stderr
    lines = {line.split(":", 1)[0]: line for line in cli.stdout.splitlines()}
    assert lines["text"] == f"text: mmgen {MMGEN_VERSION}; modalities: CharTokenizer"
    # the plugin that fails to import: named on stderr and in the listing, with its distribution and the error
    assert "plugin 'broken'" in cli.stderr and "mmgen_broken_import needs a library" in cli.stderr
    assert "ERROR:" in lines["broken"] and "mmgen-broken-import" in lines["broken"]
    assert "ImportError: mmgen_broken_import needs a library that is not installed" in lines["broken"]
    # listed under its distribution and version, not as an in-process plugin
    assert lines["broken"] == ("broken: mmgen-broken-import 0.0.1; modalities: -; ERROR: failed to load entry point "
                               "'mmgen_broken_import' from mmgen-broken-import: ImportError: mmgen_broken_import "
                               "needs a library that is not installed")
    assert lines["future"].startswith("future: mmgen-future-hook 0.0.1; modalities: -; ERROR: failed to load")
    # the plugin with a hook this mmgen does not define: reported and skipped, without taking the others down
    assert "plugin 'future'" in cli.stderr
    assert "ERROR:" in lines["future"] and "mmgen_register_something_new" in lines["future"]
    assert "FutureTokenizer" not in cli.stdout


@pytest.fixture
def forget_broken_modules():
    yield
    for module in ("mmgen_future_hook", "mmgen_broken_import"):
        sys.modules.pop(module, None)


def test_broken_plugin_distributions_in_process(broken_site, monkeypatch, capsys, forget_broken_modules):
    # the same distributions found by importlib.metadata in this process (no subprocess, no mock)
    monkeypatch.syspath_prepend(str(broken_site))
    pm = plugins.load_plugins()  # must not raise
    assert pm.get_plugin("future") is None and pm.get_plugin("broken") is None
    assert plugins.load_plugins() is pm
    catalogue = plugins.modalities()
    assert "CharTokenizer" in catalogue and "FutureTokenizer" not in catalogue
    rows = {row["plugin"]: row for row in plugins.plugin_info()}
    assert {"broken", "future", "text"} <= set(rows)
    assert rows["future"]["modalities"] == [] and "unknown hook" in rows["future"]["error"]
    assert "ImportError" in rows["broken"]["error"]
    assert (rows["broken"]["distribution"], rows["broken"]["version"]) == ("mmgen-broken-import", "0.0.1")
    assert (rows["future"]["distribution"], rows["future"]["version"]) == ("mmgen-future-hook", "0.0.1")
    err = capsys.readouterr().err
    assert "'broken'" in err and "'future'" in err
    with pytest.raises(plugins.PluginError, match="plugin 'broken' failed"):
        plugins.get_modality("BrokenTokenizer")


# ---------------------------------------------------------------- the mmgen plugins command

def test_mmgen_plugins_command_lists_the_text_plugin(tmp_path):
    cli = run_python(["-m", "mmgen", "plugins"], subprocess_env(), tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert f"text: mmgen {MMGEN_VERSION}; modalities: CharTokenizer" in cli.stdout.splitlines()


def test_mmgen_plugins_command_in_process(capsys):
    from mmgen.cli import main

    register(FakePlugin(make_modality("Local")), "local")
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "local: (in-process); modalities: Local" in lines
    assert f"text: mmgen {MMGEN_VERSION}; modalities: CharTokenizer" in lines
    assert lines == sorted(lines)  # one line per plugin, by plugin name


def test_mmgen_plugins_command_with_no_plugins(monkeypatch, capsys):
    from mmgen.cli import main

    monkeypatch.setenv(plugins.ENV_RESTRICT, "")
    assert main(["plugins"]) == 0
    assert capsys.readouterr().out.strip() == "no mmgen plugins installed"


def test_mmgen_plugins_command_reports_a_name_clash(capsys):
    from mmgen.cli import main

    register(FakePlugin(make_modality("CharTokenizer")), "impostor")
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert "mmgen plugins: error:" in err and "'impostor'" in err and "'text'" in err


@pytest.mark.parametrize("tokenizer", [[], ["--data.tokenizer", "mmgen_text.CharTokenizer"]],
                         ids=["short name", "full class path"])
def test_fit_with_a_name_clash_stops_at_start_naming_both_plugins(tokenizer, capsys):
    from mmgen.cli import main
    from mmgen.config import cli_main

    recipe = str(REPO / "recipes/text/shakespeare_char_cpu.yaml")
    register(FakePlugin(make_modality("CharTokenizer")), "impostor")
    expected = (f"modality name 'CharTokenizer' is registered by two plugins: plugin 'impostor' (not installed as a "
                f"distribution) and plugin 'text' (mmgen {MMGEN_VERSION}); uninstall one or restrict loading with "
                f"{plugins.ENV_RESTRICT}")
    with pytest.raises(plugins.PluginError) as info:
        cli_main(["fit", "--config", recipe, *tokenizer, "--trainer.max_steps", "1"])
    assert str(info.value) == expected
    assert main(["fit", "--config", recipe, *tokenizer, "--trainer.max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"mmgen: error: {expected}\n"  # before the parser runs: no "Multiple subclasses", no training
