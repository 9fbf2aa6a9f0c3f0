"""The ``magnetar`` command line: argument parsing and the error boundary.

Every ``MagnetarError`` ends here as one line on stderr and a non-zero exit;
users never see a traceback for a problem they can fix.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from magnetar.agent import models
from magnetar.runtime.errors import MagnetarError
from magnetar.runtime.limits import DEFAULT_CTX, parse_cache_size

PRESETS = ("tiny", "small", "mini-flash")
RECIPES = ("f32", "f16", "q8", "q2", "q4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magnetar", description="A local coding agent running DeepSeek V4 Flash in-process.")
    parser.add_argument("--model", "-m", dest="tui_model", default=None, metavar="MODEL",
                        help="the TUI's model (default: $MAGNETAR_MODEL, then the models folder)")
    parser.add_argument("--ctx", dest="tui_ctx", type=int, default=DEFAULT_CTX,
                        help=f"the TUI's context in tokens (default {DEFAULT_CTX})")
    parser.add_argument("--mode", dest="tui_mode", choices=("ask", "auto-edit", "yolo", "read-only"), default="ask",
                        help="what tools may do without asking (default ask)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="ID",
                        help="resume a session (by id prefix; no id: the latest for this repository)")
    parser.add_argument("--continue", dest="continue_", action="store_true",
                        help="resume the latest session of this repository")
    _add_sandbox_flags(parser)
    _add_streaming_flags(parser, prefix="tui_")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _model_file_commands(sub)
    _agent_commands(sub)
    _measuring_commands(sub)
    return parser


def _model_file_commands(sub) -> None:
    """The lab's model-file commands, then generate (a front end on the Engine)."""
    p = sub.add_parser("make-model", help="write a random-weight V4 GGUF for tests and benchmarks")
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--recipe", choices=RECIPES, default="q8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, metavar="PATH")
    p.set_defaults(run=_command("runtime.lab.commands", "make_model"))

    p = sub.add_parser("convert", help="convert a transformers DeepseekV4 checkpoint to a ds4-layout GGUF")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf")
    p.add_argument("--recipe", choices=RECIPES, default="q8")
    p.add_argument("--imatrix", metavar="FILE.dat", help="importance matrix for the q2/q4 experts (magnetar imatrix)")
    p.set_defaults(run=_command("runtime.lab.commands", "convert"))

    p = sub.add_parser("tokenize", help="print the token ids of a text or a rendered chat prompt")
    p.add_argument("-m", "--model", required=True, metavar="MODEL")
    p.add_argument("-p", "--prompt", required=True, metavar="TEXT",
                   help="the text, or @FILE to read it from a file")
    p.add_argument("--chat", action="store_true", help="render as a chat prompt (BOS, user turn, assistant opener)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system text for --chat")
    _add_mode_flags(p)
    p.set_defaults(run=_command("runtime.lab.commands", "tokenize"))

    p = sub.add_parser("inspect", help="summarize a model file")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--expert-cache", type=_expert_cache_size, default=None, metavar="SIZE|auto",
                   help="also show what stays resident and what streams from the file with this expert cache")
    p.set_defaults(run=_command("runtime.lab.commands", "inspect"))


    p = sub.add_parser("generate", help="chat-render a prompt and stream the model's answer")
    p.add_argument("-m", "--model", required=True, metavar="MODEL")
    p.add_argument("-p", "--prompt", required=True, metavar="TEXT", help="the user message, or @FILE")
    p.add_argument("--system", default=None, metavar="TEXT")
    _add_mode_flags(p)
    p.add_argument("-n", dest="max_tokens", type=int, default=256, metavar="N", help="tokens to generate")
    p.add_argument("--temp", type=float, default=1.0, help="temperature; 0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX,
                   help=f"context size in tokens (default {DEFAULT_CTX}, up to 1048576)")
    p.add_argument("--dump-logprobs", default=None, metavar="OUT.json",
                   help="write each generated token's logprob and the top alternatives")
    p.add_argument("--logprobs-top-k", type=int, default=0, metavar="K")
    _add_streaming_flags(p)
    _add_pipeline_flags(p)
    p.set_defaults(run=_command("agent.generate_command", "generate"))


def _agent_commands(sub) -> None:
    """The agent room: headless run, the server, the sandbox, review, download, sessions."""
    p = sub.add_parser("run", help="headless: run one task with the agent's tools, print the answer")
    p.add_argument("-p", "--prompt", required=True, metavar="TEXT", help="the task")
    p.add_argument("-m", "--model", default=None, metavar="MODEL",
                   help="model file (default: $MAGNETAR_MODEL, then the models folder)")
    p.add_argument("--mode", choices=("read-only", "auto-edit", "yolo", "ask"), default="read-only",
                   help="what tools may do without asking; nothing can be asked headless (default read-only)")
    p.add_argument("--json", action="store_true", help="print every loop event as a JSON line")
    p.add_argument("--stream", action="store_true", help="print the answer text as it is generated")
    p.add_argument("--cwd", default=None, metavar="DIR", help="the project (default: the current directory)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"context size in tokens (default {DEFAULT_CTX})")
    p.add_argument("--max-steps", type=int, default=40, help="tool-call steps before the turn stops")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens the model may write per step")
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    _add_sandbox_flags(p)
    _add_streaming_flags(p)
    _add_pipeline_flags(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--nothink", dest="think_mode", action="store_const", const="nothink")
    g.add_argument("--think", dest="think_mode", action="store_const", const="think")
    p.set_defaults(run=_command("agent.headless", "run"), think_mode="think")

    p = sub.add_parser("serve", help="serve the model over OpenAI Chat/Responses/Completions and Anthropic "
                                     "Messages (Claude Code, Codex, opencode, the SDKs)")
    p.add_argument("-m", "--model", default=None, metavar="MODEL",
                   help="model file (default: $MAGNETAR_MODEL, then the models folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (not loopback: needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"context size in tokens (default {DEFAULT_CTX})")
    p.add_argument("--api-key", default=None, metavar="KEY", help="required as Bearer or x-api-key on every route")
    p.add_argument("--kv-disk-dir", default=None, metavar="DIR", help="prefix cache of KV checkpoints on disk")
    p.add_argument("--kv-disk-space-mb", type=int, default=16384, metavar="N", help="its budget (LRU, default 16384)")
    p.add_argument("--cors", default=None, metavar="ORIGIN", help="allow browser requests from ORIGIN")
    _add_streaming_flags(p)
    _add_pipeline_flags(p)
    p.set_defaults(run=_command("agent.server.run", "run"))

    p = sub.add_parser("sandbox", help="run one command exactly as the agent's shell tool would (same OS "
                                       "sandbox); exit with its code")
    p.add_argument("--mode", choices=("ask", "auto-edit", "yolo", "read-only"), default="ask",
                   help="read-only: nothing writable; the others: the project and $TMPDIR writable")
    p.add_argument("--timeout-s", type=int, default=120, metavar="S", help="seconds before it is killed")
    _add_sandbox_flags(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                   help="one word is a bash command line; several are quoted as given")
    p.set_defaults(run=_command("agent.sandbox_command", "run"))

    p = sub.add_parser("review", help="review code or a diff with read-only tools; markdown, JSON or SARIF")
    p.add_argument("path", nargs="?", default=".", metavar="PATH", help="file or folder (default: the repository)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--diff", default=None, metavar="REF", help="review what changed since the branch left REF")
    g.add_argument("--staged", action="store_true", help="review the staged changes")
    g.add_argument("--uncommitted", action="store_true", help="review all uncommitted changes")
    p.add_argument("--format", choices=("markdown", "json", "sarif"), default="markdown")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="write the report here (default stdout)")
    p.add_argument("--fail-on", dest="fail_on", choices=("high", "medium", "low"), default=None,
                   help="exit 1 when a finding of this severity or worse exists")
    p.add_argument("-m", "--model", default=None, metavar="MODEL")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"context size in tokens (default {DEFAULT_CTX})")
    p.add_argument("--max-steps", type=int, default=40, help="tool-call steps before the review stops")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens the model may write per step")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--temp", type=float, default=1.0)
    _add_streaming_flags(p)
    p.set_defaults(run=_command("agent.review_mode", "run"))

    p = sub.add_parser("download", help="download a DeepSeek V4 Flash GGUF into the models folder")
    p.add_argument("name", choices=tuple(models.KNOWN), help="q2-imatrix is the one to start with")
    p.add_argument("--dir", default=None, metavar="DIR", help="destination folder (default: the models folder)")
    p.set_defaults(run=_command("agent.download", "download"))

    p = sub.add_parser("sessions", help="list saved sessions (id, age, tokens, size, repository, title)")
    p.set_defaults(run=_command("agent.sessions", "list_command"))


def _measuring_commands(sub) -> None:
    """The lab's measurements: imatrix, profile-experts, quality, bench."""
    p = sub.add_parser("imatrix", help="collect an importance matrix for quantizing the routed experts")
    p.add_argument("-m", "--model", required=True, metavar="MODEL")
    p.add_argument("--prompts", required=True, metavar="FILE", help="text split by '---' lines, or .jsonl {\"text\"}")
    p.add_argument("-o", "--output", required=True, metavar="OUT.dat")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per prompt (longer ones are cut)")
    p.add_argument("--ctx", type=int, default=4096,
                   help="context in tokens (default 4096: it holds one prompt at a time, raised to --max-tokens)")
    _add_streaming_flags(p)
    p.set_defaults(run=_command("runtime.lab.commands", "imatrix"))

    p = sub.add_parser("profile-experts", help="count the routed experts prompts pick: a hotlist for --hotlist")
    p.add_argument("-m", "--model", required=True, metavar="MODEL")
    p.add_argument("--prompts", required=True, metavar="FILE", help="text split by '---' lines, or .jsonl {\"text\"}")
    p.add_argument("-o", "--output", required=True, metavar="HOT.txt", help="the hotlist (ds4's text format)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per prompt (longer ones are cut)")
    p.add_argument("--ctx", type=int, default=4096,
                   help="context in tokens (default 4096: it holds one prompt at a time, raised to --max-tokens)")
    _add_streaming_flags(p)
    p.set_defaults(run=_command("runtime.lab.commands", "profile_experts"))

    p = sub.add_parser("quality", help="KL divergence and top-k agreement of a quantized model vs a reference")
    p.add_argument("-m", "--model", required=True, metavar="QUANT", help="the quantized model")
    p.add_argument("--ref", required=True, metavar="REF", help="the higher-precision model")
    p.add_argument("--prompts", required=True, metavar="FILE", help="text split by '---' lines, or .jsonl {\"text\"}")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N",
                   help="tokens per prompt, BOS included (longer ones are cut; default 512)")
    p.add_argument("--top-k", type=int, default=10, metavar="K", help="k of the top-k overlap (default 10)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="the engines' context in tokens (default: --max-tokens)")
    p.add_argument("--json", metavar="OUT.json", help="also write per-prompt and overall numbers as JSON")
    p.set_defaults(run=_command("runtime.lab.commands", "quality"))

    p = sub.add_parser("bench", help="decode/prefill speed side by side with optional peers; kernels vs the "
                                     "memory floor; checkpoint resume vs re-prefill; the server vs generate; "
                                     "one decode token's time per block and layer")
    p.add_argument("mode", choices=("decode", "prefill", "kernels", "resume", "server", "distributed", "streaming",
                                    "blocks"))
    p.add_argument("-m", "--model", metavar="MODEL", help="the model (decode, prefill, resume and server)")
    p.add_argument("--peers", default="", metavar="LIST",
                   help="comma list of transformers, mlx-lm, llama.cpp (dev-only packages), magnetar-q8k (ours with 8-bit expert activations), magnetar-q8 (ours with 8-bit activations throughout)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt length (default 128 for decode, 512 for prefill)")
    p.add_argument("--tokens", "--max-tokens", dest="tokens", type=int, default=32,
                   help="decode tokens timed per rep")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="server: the user message, or @FILE")
    p.add_argument("--client", choices=("process", "thread"), default="process",
                   help="server: where the openai client runs (default: its own process, as users run one)")
    p.add_argument("--turns", type=int, default=5, help="server: turns of the agent conversation (default 5)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ctx", type=int, default=4096,
                   help="context in tokens (default 4096: it holds the timed prompt and tokens; peers such as "
                        "llama.cpp allocate their whole context up front)")
    p.add_argument("--csv", default=None, metavar="OUT.csv")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="decode/prefill: also draw tok/s per peer (needs matplotlib)")
    p.add_argument("--nodes", action="store_true",
                   help="decode/prefill: count the compiled decode step's MLX graph nodes, per token and layer")
    p.add_argument("--wait-quiet", action="store_true",
                   help="before each timed call, wait until other processes use < 0.25 cores")
    p.add_argument("--memory-budget", type=_memory_budget, default=None, metavar="SIZE|auto",
                   help="decode/prefill: memory the peers may fill together (default auto: what is free now); "
                        "beyond it the bench warns and marks its results memory-bound")
    p.add_argument("--strict-memory", action="store_true",
                   help="decode/prefill: stop with an error instead when the peers exceed --memory-budget")
    p.add_argument("--recipe", choices=("q2", "q4"), default="q2", help="kernels: expert encoding")
    p.add_argument("--backend", default="cpu", help="kernels, blocks: the backend to time")
    p.add_argument("--experts", type=int, default=256, help="kernels: experts in the stack")
    p.add_argument("--lengths", default="8192,32768", metavar="N,N",
                   help="resume, distributed: sequence lengths in tokens (default 8192,32768)")
    p.add_argument("--ranks", type=int, default=2, help="distributed: local ranks (default 2)")
    p.add_argument("--layers", default="auto", metavar="auto|A:B,...", help="distributed: the split (default auto)")
    p.add_argument("--cache-shares", default="10,25,50,100", metavar="P,P",
                   help="streaming: expert-cache sizes in percent of the routed experts (default 10,25,50,100)")
    p.add_argument("--zipf", type=float, default=1.1, help="streaming: exponent of the forced skewed routing")
    _add_streaming_flags(p)
    p.set_defaults(run=_bench)


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--nothink", dest="mode", action="store_const", const="nothink",
                   help="answer directly (the prompt ends with </think>)")
    g.add_argument("--think", dest="mode", action="store_const", const="think",
                   help="reason first (the prompt ends with <think>; default)")
    g.add_argument("--think-max", dest="mode", action="store_const", const="think-max",
                   help="reason with the Think-Max prefix")
    p.set_defaults(mode="think")


def _expert_cache_size(text: str) -> int | str:
    try:
        return parse_cache_size(text)
    except MagnetarError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _memory_budget(text: str) -> int | None:
    """``--memory-budget``: bytes like ``24G``, or None for ``auto`` (what the OS has free)."""
    try:
        size = parse_cache_size(text)
    except MagnetarError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use auto, or bytes like 512M or 24G") from None
    return None if size == "auto" else size


def _add_streaming_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The engine flags every model-loading command has (console.engine_options reads them)."""
    # Checked by Engine.load (a bad value is its one-line error), so the choices live with the kernels.
    p.add_argument("--expert-act", dest=prefix + "expert_act", default=None, metavar="f32|q8k|q8",
                   help="the CPU activations: f32 (default, or $MAGNETAR_EXPERT_ACT); q8k: the routed experts' "
                   "as 8-bit Q8_K summed in integers, the arithmetic of ds4's and llama.cpp's CPU paths, faster "
                   "for ~1e-2 relative rounding per expert output; q8: q8k, and the decode-sized Q8_0 products' "
                   "(attention, shared expert, head) as Q8_0, llama.cpp's arithmetic for them, faster for ~0.5%% "
                   "per product (cpu backend only)")
    p.add_argument("--expert-cache", dest=prefix + "expert_cache", type=_expert_cache_size, default=None,
                   metavar="SIZE|auto", help="stream the routed experts from the model file through a cache of "
                   "SIZE bytes (512M, 24G; auto: what RAM allows) instead of loading them all")
    p.add_argument("--hotlist", dest=prefix + "hotlist", default=None, metavar="FILE",
                   help="with --expert-cache: preload the hottest experts listed (magnetar profile-experts)")


def _add_pipeline_flags(p: argparse.ArgumentParser) -> None:
    """Layer split over several processes or machines (MLX ring; runtime/distributed.py)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ranks", type=int, default=None, metavar="N",
                   help="split the layers over N local processes on 127.0.0.1 (to try a split on one machine)")
    g.add_argument("--distributed", default=None, metavar="HOSTFILE",
                   help="this machine is rank $MLX_RANK of MLX's ring hostfile (as mlx.launch starts it); "
                        "every rank runs the same command, ranks > 0 serve their layers")
    p.add_argument("--layers", default="auto", metavar="auto|A:B,C:D,...",
                   help="each rank's layers, half-open and contiguous from 0 (default auto: the ranks time "
                        "their layers and the split balances measured prefill time)")


def _add_sandbox_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-network", action="store_true", help="shell commands may use the network")
    p.add_argument("--dangerously-no-sandbox", action="store_true",
                   help="run shell commands outside the OS sandbox, with all of your rights")


def _bench(args: argparse.Namespace) -> int:
    """``bench server`` lives with the server (the lab may not import the agent room)."""
    if args.mode == "server":
        return _command("agent.server.bench", "run")(args)
    return _command("runtime.lab.commands", "bench")(args)


def _command(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A room's command, imported when it runs: ``magnetar sandbox`` need not load MLX."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"magnetar.{module}"), function)(args)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if getattr(args, "command", None) == "bench" and args.prompt_tokens is None:
        args.prompt_tokens = 512 if args.mode == "prefill" else 128
    if run is None:
        args.model, args.ctx, args.mode = args.tui_model, args.tui_ctx, args.tui_mode
        args.expert_cache, args.hotlist, args.expert_act = args.tui_expert_cache, args.tui_hotlist, args.tui_expert_act
        run = _command("agent.launch", "open_tui")
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
