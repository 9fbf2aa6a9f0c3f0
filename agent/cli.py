"""The ``magnetar`` command line: argument parsing and the error boundary.

Every ``MagnetarError`` ends here as one line on stderr and a non-zero exit;
users never see a traceback for a problem they can fix.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from magnetar.runtime.errors import MagnetarError

from . import model_commands

PRESETS = ("tiny", "small", "mini-flash")
RECIPES = ("f32", "f16", "q8", "q2", "q4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magnetar", description="A local coding agent running DeepSeek V4 Flash in-process.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("make-model", help="write a random-weight V4 GGUF for tests and benchmarks")
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--recipe", choices=RECIPES, default="q8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, metavar="PATH")
    p.set_defaults(run=model_commands.make_model)

    p = sub.add_parser("convert", help="convert a transformers DeepseekV4 checkpoint to a ds4-layout GGUF")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf")
    p.add_argument("--recipe", choices=RECIPES, default="q8")
    p.set_defaults(run=model_commands.convert)

    p = sub.add_parser("tokenize", help="print the token ids of a text or a rendered chat prompt")
    p.add_argument("-m", "--model", required=True, metavar="MODEL")
    p.add_argument("-p", "--prompt", required=True, metavar="TEXT",
                   help="the text, or @FILE to read it from a file")
    p.add_argument("--chat", action="store_true", help="render as a chat prompt (BOS, user turn, assistant opener)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system text for --chat")
    _add_mode_flags(p)
    p.set_defaults(run=model_commands.tokenize)

    p = sub.add_parser("inspect", help="summarize a model file")
    p.add_argument("model", metavar="MODEL")
    p.set_defaults(run=model_commands.inspect)
    return parser


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--nothink", dest="mode", action="store_const", const="nothink",
                   help="answer directly (the prompt ends with </think>)")
    g.add_argument("--think", dest="mode", action="store_const", const="think",
                   help="reason first (the prompt ends with <think>; default)")
    g.add_argument("--think-max", dest="mode", action="store_const", const="think-max",
                   help="reason with the Think-Max prefix")
    p.set_defaults(mode="think")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 0
    try:
        return run(args)
    except MagnetarError as err:
        print(f"magnetar: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("magnetar: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
