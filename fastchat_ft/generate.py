"""`fastchat-ft generate`: chat with a model folder, a run directory or a LoRA checkpoint (merged in memory),
one prompt or an interactive session, streaming tokens as they are decoded."""
from __future__ import annotations

import sys

from fastchat_ft import flags
from fastchat_ft.errors import ConfigError
from fastchat_ft.inference import ChatStream, load_model, sampling_problem

HELP = "(/reset starts over, /exit or Ctrl-D quits)"


def run_generate(args) -> int:
    check_generate_args(args)
    loaded = load_model(args.model, trust_remote_code=getattr(args, "trust_remote_code", False))
    print(f"loaded {loaded.source.describe()}" + "".join(f"; {n}" for n in loaded.notes), file=sys.stderr)
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=getattr(args, "top_p", 1.0), seed=getattr(args, "seed", None))
    system = [{"role": "system", "content": args.system}] if getattr(args, "system", None) else []
    if args.prompt is not None:
        reply(loaded, system + [{"role": "user", "content": args.prompt}], opts)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {loaded.source.path} {HELP}", file=sys.stderr)
    history = list(system)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": line})
        stream = reply(loaded, history, opts, prefix="assistant> " if interactive else "")
        history.append({"role": "assistant", "content": stream.text})
    return 0


def check_generate_args(args) -> None:
    """Values no reply can be decoded with, refused before the model loads."""
    flags.at_least(args, {"max_new_tokens": 1})
    problem = sampling_problem(args.temperature, getattr(args, "top_p", 1.0))
    if problem:
        flag = flags.flag_name(problem[0])
        raise ConfigError(problem[1], field=flag, fix=f"pass {flag} in that range, or leave it out for the default")


def reply(loaded, messages: list[dict], opts: dict, prefix: str = "") -> ChatStream:
    stream = ChatStream(loaded.model, loaded.tokenizer, messages, **opts)
    sys.stdout.write(prefix)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stream.finish_reason == "length":
        print(f"[stopped at --max-new-tokens {opts['max_new_tokens']} before an end-of-turn token]", file=sys.stderr)
    return stream
