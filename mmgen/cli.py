"""The ``mmgen`` command: ``fit``/``validate``/``test``/``predict`` go to LightningCLI (:mod:`mmgen.config`);
the tools in :data:`TOOLS` (``plugins``, ``generate``) are mmgen's own."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable

from mmgen import plugins

__all__ = ["TOOLS", "main", "tool_description"]


def tool_description(tool: Callable[[list[str]], int]) -> str:
    """A tool's one-line description for `mmgen --help`: the first line of its docstring."""
    return (inspect.getdoc(tool) or "").partition("\n")[0]


def _plugins(argv: list[str]) -> int:
    """List the installed mmgen plugins and the modality names they register."""
    argparse.ArgumentParser(prog="mmgen plugins", description=tool_description(_plugins)).parse_args(argv)
    rows = plugins.plugin_info()
    if not rows:
        print("no mmgen plugins installed")
    for row in rows:
        dist = f"{row['distribution']} {row['version']}" if row["distribution"] else "(in-process)"
        names = ", ".join(row["modalities"]) or "-"
        print(f"{row['plugin']}: {dist}; modalities: {names}" + (f"; ERROR: {row['error']}" if row["error"] else ""))
    return 0


def _generate(argv: list[str]) -> int:
    """Generate text from a language-model checkpoint."""
    p = argparse.ArgumentParser(prog="mmgen generate", description=tool_description(_generate))
    p.add_argument("--ckpt", required=True, help="checkpoint path")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--unknown", choices=["error", "unk"], default=None,
                   help="a prompt character outside the vocabulary: error, or map it to <unk> (default: the "
                        "checkpoint's setting)")
    a = p.parse_args(argv)
    import torch

    from mmgen.api import load
    from mmgen.modality import VocabularyError
    from mmgen.sampling import check_sampling

    check_sampling(temperature=a.temperature, top_p=a.top_p)  # before anything is written
    model = load(a.ckpt, device=a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.unknown is not None:
        if not hasattr(model.text, "unknown"):
            raise ValueError(f"--unknown: this checkpoint's tokenizer {type(model.text).__name__} has no `unknown` "
                             f"setting")
        model.text.unknown = a.unknown
    try:  # before anything is written: a bad prompt leaves stdout empty
        model.text.encode(a.prompt)
    except VocabularyError as exc:
        hint = str(exc).replace("set `unknown: unk`", "pass `--unknown unk`")
        raise VocabularyError(f"prompt: {hint}") from None
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


# mmgen's own tools: name -> function(argv) -> exit status. `main` runs them; `mmgen --help` lists them beside
# LightningCLI's subcommands, described by the first line of each function's docstring.
def _transcribe(argv: list[str]) -> int:
    """Transcribe sound files with a speech-recognition checkpoint (one line per file, and the real-time factor)."""
    from mmgen.transcribe import transcribe_command

    return transcribe_command(argv)


TOOLS: dict[str, Callable[[list[str]], int]] = {"plugins": _plugins, "generate": _generate,
                                                 "transcribe": _transcribe}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        try:
            return TOOLS[argv[0]](argv[1:])
        except (plugins.PluginError, ValueError, FileNotFoundError) as exc:
            print(f"mmgen {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
    from mmgen.config import ConfigError, cli_main  # Lightning is imported only for training commands

    from mmgen.checkpoint import CheckpointError
    from mmgen.data import DataFileError
    from mmgen.modality import VocabularyError

    try:
        cli_main(None if argv == sys.argv[1:] else argv)
    except (ConfigError, DataFileError, VocabularyError, CheckpointError, plugins.PluginError) as exc:
        # Bad input, not a bug: one line naming the problem and what is accepted, no traceback.
        print(f"mmgen: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
