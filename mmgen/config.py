"""mmgen's LightningCLI: recipes (YAML) and command-line overrides -> trainer, model and data module.

Plugins are loaded before the parser is built, so recipes name plugin classes by class name; the model receives the
data module's modalities by role; a config that does not fit the schema is reported in one line.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mmgen import __version__, plugins

__all__ = ["ConfigError", "MMGenCLI", "cli_main", "explain_parser_error"]


def explain_parser_error(message: str) -> str:
    """jsonargparse's nested error report -> one line naming the problem and what is accepted."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    where = ".".join(k for k in keys if k != "init_args") or "config"
    bad_class = re.search(r"(?:Expected a dot import path string:|Import path)\s*['\"]?([\w.]+)", message)
    if bad_class:
        known = plugins.known_names(plugins.modalities())
        return (f"{where}: unknown class {bad_class.group(1)!r}; known modality plugins: {known} "
                f"(tasks and data modules: {', '.join(_known_components())})")
    option = re.search(r"Option '([^']+)' is not accepted", message)
    owner = re.search(r"Problem with given class_path '([\w.]+)'", message)
    if option:
        name = option.group(1)
        accepted = _accepted_options(owner.group(1)) if owner else []
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        cls = owner.group(1).rsplit(".", 1)[-1] if owner else where
        return f"{where}: {cls} has no option {name!r}{hint}; accepted: {', '.join(accepted)}"
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    detail = [ln for ln in lines if not ln.startswith(("Does not validate", "Subtypes:", "Errors:", "Given value",
                                                        "- Expected a <class 'NoneType'>"))]
    return "; ".join(detail)


def _accepted_options(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "modalities")]


def _known_components() -> list[str]:
    """Task and data-module classes mmgen defines (recipes name them by class name)."""
    import mmgen.data  # noqa: F401
    import mmgen.tasks  # noqa: F401

    return sorted(c.__name__ for base in (LightningModule, LightningDataModule) for c in base.__subclasses__()
                  if c.__module__.startswith("mmgen"))


class MMGenCLI(LightningCLI):
    """LightningCLI whose model receives the data module's modalities (by role) when both are instantiated."""

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"mmgen {__version__}"])
        kwargs["exit_on_error"] = False  # cli_main reports a bad config in one line instead of a usage dump
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.modalities", "model.init_args.modalities", apply_on="instantiate")


def cli_main(args: list[str] | None = None, **kwargs) -> MMGenCLI:
    plugins.load_plugins()  # before the parser is built, so recipes can name plugin classes by their class name
    import mmgen.data  # noqa: F401  (tasks and data modules become known short class names)
    import mmgen.tasks  # noqa: F401

    try:
        return MMGenCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        args=args, save_config_kwargs={"overwrite": True}, **kwargs)
    except ArgumentError as exc:
        raise ConfigError(explain_parser_error(str(exc))) from None


class ConfigError(ValueError):
    """A recipe or command line that does not fit the schema."""
