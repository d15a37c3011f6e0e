"""mmgen's LightningCLI: recipes (YAML) and command-line overrides -> trainer, model and data module.

Plugins are loaded before the parser is built, so recipes name plugin classes by class name; the model receives the
data module's modalities by role; a config that does not fit the schema is reported in one line.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import jsonargparse
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mmgen import __version__, plugins

__all__ = ["ConfigError", "MMGenCLI", "cli_main", "explain_parser_error"]

# What each LightningCLI subcommand needs the task to define (``predict`` can also fall back to ``forward``).
STEPS = {"fit": "training_step", "validate": "validation_step", "test": "test_step", "predict": "predict_step"}


class ConfigError(ValueError):
    """A recipe or command line that does not fit the schema."""


def explain_parser_error(message: str, options: Iterable[str] = ()) -> str:
    """jsonargparse's nested error report -> one line naming the problem and what is accepted.

    ``options`` are the parser's option names (``trainer.max_steps``, ...), used to suggest the closest one for an
    option the parser does not know.
    """
    keys = re.findall(r'Parser key "([^"]+)"', message)
    where = ".".join(k for k in keys if k != "init_args") or "config"
    bad_class = re.search(r"(?:Expected a dot import path string:|Import path)\s*['\"]?([\w.]+)", message)
    if bad_class:
        known = plugins.known_names(plugins.modalities())
        return (f"{where}: unknown class {bad_class.group(1)!r}; known modality plugins: {known} "
                f"(tasks and data modules: {', '.join(_known_components())})")
    option = re.search(r"Option '([^']+)' is not accepted", message)
    if option:
        # jsonargparse nests one "Problem with given class_path" per class level: the innermost one owns the option
        # (data -> TextDataModule -> tokenizer -> CharTokenizer).
        owners = re.findall(r"Problem with given class_path '([\w.]+)'", message)
        name = option.group(1)
        accepted = _accepted_options(owners[-1]) if owners else []
        cls = owners[-1].rsplit(".", 1)[-1] if owners else where
        return f"{where}: {cls} has no option {name!r}{_did_you_mean(name, accepted)}; accepted: {', '.join(accepted)}"
    options = sorted(set(options))
    unknown = re.search(r"(?:does not accept option '([^']+)'|unrecognized arguments: -*([^\s=]+))", message)
    if unknown:
        name = unknown.group(1) or unknown.group(2)
        dashes = "" if unknown.group(1) else "--"
        hint = _did_you_mean(name, options, prefix=dashes)
        return message.strip().replace("\n", "; ") + hint
    value = _explain_value(message)
    if value is not None:
        expected, given = value
        return f"{where}: expected {expected}, got {given!r}"
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    detail = [ln for ln in lines if not ln.startswith(("Does not validate", "Subtypes:", "Errors:", "Given value",
                                                        "- Expected a <class 'NoneType'>"))]
    return "; ".join(detail)


def _did_you_mean(name: str, accepted: Iterable[str], prefix: str = "") -> str:
    accepted = list(accepted)
    close = difflib.get_close_matches(name, accepted, n=1)
    if not close and "." in name:  # a misspelt first part: 'modle.init_args.num_layers'
        head, rest = name.split(".", 1)
        heads = difflib.get_close_matches(head, sorted({a.split(".", 1)[0] for a in accepted}), n=1)
        close = [f"{heads[0]}.{rest}"] if heads else []
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _explain_value(message: str) -> tuple[str, str] | None:
    """The expected type and the given value of a value-type error: the report under the innermost parser key."""
    lines = message.splitlines()
    starts = [i for i, ln in enumerate(lines) if re.match(r'\s*Parser key "[^"]+":\s*$', ln)]
    if not starts:
        return None
    indent = len(lines[starts[-1]]) - len(lines[starts[-1]].lstrip())
    block = []
    for ln in lines[starts[-1] + 1:]:
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            break  # back at an outer level: the rest of an enclosing union's report
        if ln.strip():
            block.append(ln.strip())
    if not block:
        return None
    single = re.match(r"Expected an? (.+?)\. Got value: (.*)$", block[0])
    if single:
        return _type_names([single.group(1)]), single.group(2)
    if block[0].startswith("Does not validate against any of the Union subtypes"):
        expected = [m.group(1) for ln in block if (m := re.match(r"- Expected an? (.+?)(?:\. Got value: .*)?$", ln))]
        given = next((ln[len("Given value: "):] for ln in block if ln.startswith("Given value: ")), None)
        if expected and given is not None:
            return _type_names(expected), given
    return None


def _type_names(types: list[str]) -> str:
    """jsonargparse's type texts -> what a user writes: ``int``, ``null``, ``one of 'error', 'unk'``."""
    names: list[str] = []
    literals: list[object] = []
    for text in types:
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
        if literal:
            try:
                literals.extend(ast.literal_eval(f"[{literal.group(1)}]"))
                continue
            except (ValueError, SyntaxError):
                pass
        cls = re.fullmatch(r"<class '([\w.]+)'>", text)
        name = cls.group(1).rsplit(".", 1)[-1] if cls else text
        names.append("null" if name == "NoneType" else name)
    if literals:
        return "one of " + ", ".join([*(repr(v) for v in literals), *names])
    return " or ".join(names)


def _accepted_options(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "modalities")]


def _known_components() -> list[str]:
    """Task and data-module classes mmgen defines (recipes name them by class name)."""
    import mmgen.data  # noqa: F401
    import mmgen.tasks  # noqa: F401

    return sorted(c.__name__ for base in (LightningModule, LightningDataModule) for c in base.__subclasses__()
                  if c.__module__.startswith("mmgen"))


# ---------------------------------------------------------------- errors raised by a class's __init__

_JSONARGPARSE_DIR = str(Path(jsonargparse.__file__).parent)


def _raised_in(tb: TracebackType | None) -> str:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else ""


def _init_error(exc: BaseException) -> BaseException | None:
    """What a class's ``__init__`` raised, under jsonargparse's wrapping ("Does not validate against any of the Union
    subtypes" and its nested reports, which keep the original as ``__cause__``)."""
    seen: BaseException | None = exc
    while seen is not None:
        if not _raised_in(seen.__traceback__).startswith(_JSONARGPARSE_DIR):
            return seen
        seen = seen.__cause__
    return None


def _init_owner(exc: BaseException) -> str | None:
    """The class whose ``__init__`` raised ``exc``: the outermost ``__init__`` frame of its traceback."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if (frame.f_code.co_name == "__init__" and "self" in frame.f_locals
                and not frame.f_code.co_filename.startswith(_JSONARGPARSE_DIR)):
            return type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return None


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def supported_subcommands(task: type) -> list[str]:
    """The LightningCLI subcommands a task class can run: those whose step method it defines."""
    def defines(sub: str) -> bool:
        own = getattr(task, STEPS[sub], None) is not getattr(LightningModule, STEPS[sub])
        return own or (sub == "predict" and task.forward is not LightningModule.forward)  # Lightning's own rule

    return [sub for sub in STEPS if defines(sub)]


class MMGenCLI(LightningCLI):
    """LightningCLI whose model receives the data module's modalities (by role) when both are instantiated.

    Beyond LightningCLI: option prefixes are not accepted (``--trainer.max_step`` is an error, not ``max_steps``),
    mmgen's own tools (:data:`mmgen.cli.TOOLS`) are listed in ``mmgen --help``, a parse error is one line
    (:class:`ConfigError`), an error raised by a task's or data module's ``__init__`` comes out as itself instead of
    inside jsonargparse's report, and a subcommand the task does not support stops before anything is built.
    """

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"mmgen {__version__}"])
        kwargs.setdefault("prog", "mmgen")
        # (subcommand parsers get their own description from LightningCLI)
        kwargs.setdefault("description", "mmgen: train and evaluate (LightningCLI subcommands), and mmgen's tools")
        kwargs["allow_abbrev"] = False  # `--trainer.max_step 5` is a typo to report, not `--trainer.max_steps 5`
        kwargs["exit_on_error"] = False  # a bad config is reported in one line instead of a usage dump
        return super().init_parser(**kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        from mmgen.cli import TOOLS, tool_description

        # mmgen's own tools, listed beside LightningCLI's subcommands in `mmgen --help`; `mmgen.cli.main` runs them
        # before this parser is ever built, so their parsers here only carry the description.
        for name, tool in TOOLS.items():
            description = tool_description(tool)
            parser._subcommands_action.add_subcommand(name, ArgumentParser(description=description), help=description)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            names = {a.dest for p in [parser, *getattr(self, "_subcommand_parsers", {}).values()] for a in p._actions}
            raise ConfigError(explain_parser_error(str(exc), names)) from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.modalities", "model.init_args.modalities", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        model = self.config[self.subcommand].get("model")
        task = _import(model.class_path) if model is not None and model.get("class_path") else None
        if task is not None and self.subcommand not in (supported := supported_subcommands(task)):
            raise ConfigError(f"{self.subcommand}: {task.__name__} does not support this subcommand (it defines no "
                              f"{STEPS[self.subcommand]}()); it supports: {', '.join(supported) or 'none'}")

    def instantiate_classes(self) -> None:
        from mmgen.checkpoint import CheckpointError
        from mmgen.data import DataFileError
        from mmgen.modality import VocabularyError

        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as exc:
            error = _init_error(exc)
            if error is None or error is exc:
                raise
            if isinstance(error, (ConfigError, CheckpointError, DataFileError, VocabularyError, plugins.PluginError)):
                raise error from None  # its own one-line message (cli.main reports it, exit status 2)
            if isinstance(error, ValueError):  # an argument the class's __init__ rejected
                owner = _init_owner(error)
                raise ConfigError(f"{owner}: {error}" if owner else str(error)) from None
            raise


def cli_main(args: list[str] | None = None, **kwargs) -> MMGenCLI:
    plugins.load_plugins()  # before the parser is built, so recipes can name plugin classes by their class name
    # Build the catalogue now: it is where two plugins registering one class name are caught (one line naming both).
    # Loading alone does not check it, and jsonargparse resolves class names itself, so a clash would otherwise show
    # up as "Multiple subclasses with name ..." or, with a full class path, only at the first checkpoint save.
    plugins.modalities()
    import mmgen.data  # noqa: F401  (tasks and data modules become known short class names)
    import mmgen.tasks  # noqa: F401
    from mmgen.cli import TOOLS

    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv and argv[0] in TOOLS:
        raise ConfigError(f"{argv[0]!r} is an mmgen tool, not a LightningCLI subcommand: run `mmgen {argv[0]}`")
    try:
        return MMGenCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        args=args, save_config_kwargs={"overwrite": True}, **kwargs)
    except ArgumentError as exc:
        raise ConfigError(explain_parser_error(str(exc))) from None
