"""The ``mmgen`` command: LightningCLI for ``fit``/``validate``/``test``/``predict``, plus ``plugins`` and
``generate``."""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import sys
import time

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mmgen import plugins

__all__ = ["MMGenCLI", "main"]


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
        kwargs.setdefault("dump_header", [f"mmgen {__import__('mmgen').__version__}"])
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


def _plugins(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="mmgen plugins", description="List installed mmgen plugins.").parse_args(argv)
    rows = plugins.plugin_info()
    if not rows:
        print("no mmgen plugins installed")
    for row in rows:
        dist = f"{row['distribution']} {row['version']}" if row["distribution"] else "(in-process)"
        names = ", ".join(row["modalities"]) or "-"
        print(f"{row['plugin']}: {dist}; modalities: {names}" + (f"; ERROR: {row['error']}" if row["error"] else ""))
    return 0


def _generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmgen generate", description="Generate text from a language-model checkpoint.")
    p.add_argument("--ckpt", required=True, help="checkpoint path")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    from mmgen.api import load

    model = load(a.ckpt, device=a.device)
    sys.stdout.write(a.prompt)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    start = time.perf_counter()
    model.generate(a.prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                   use_cache=not a.no_cache, stream=stream)
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{a.max_new_tokens} tokens in {elapsed:.2f} s, {a.max_new_tokens / elapsed:.0f} tokens/s]", file=sys.stderr)
    return 0


TOOLS = {"plugins": _plugins, "generate": _generate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        try:
            return TOOLS[argv[0]](argv[1:])
        except (plugins.PluginError, ValueError, FileNotFoundError) as exc:
            print(f"mmgen {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
    try:
        cli_main(None if argv == sys.argv[1:] else argv)
    except ConfigError as exc:
        print(f"mmgen: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
