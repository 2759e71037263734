"""Generate text from a model: `python sample.py --prompt "ROMEO:" --temperature 0.8`.

A thin front over model.inference.sampling.generate: parse arguments, load the model
--checkpoint names (a smallgpt run, gpt2, a Hugging Face GPT-2 directory; see
model.weights.loading), print the steps (streamed text, a probability table with --show-probs,
or JSON lines with --json), or hold a conversation with --interactive, or a chat with a
chat-tuned model with --chat (the chat template of model/data/chat.py; lines from stdin are the
user's messages, piped input works too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from model.cli.common import (
    add_kernel_arguments,
    add_steering_arguments,
    check_steering,
    load_named_model,
    load_steering_option,
    run_cli,
    use_threads,
)
from model.data.chat import TURN_STOPS, ChatHistory
from model.errors import SamplingError
from model.inference.sampling import SamplingParams, Step, generate
from model.weights.loading import Pretrained

VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}
TOKEN_WIDTH = 10  # columns for a token in the --show-probs table; longer tokens are shortened


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate text from a smallgpt checkpoint.")
    p.add_argument("--checkpoint", metavar="NAME",
                   help="a run or checkpoint dir, gpt2[-medium|-large|-xl], or a Hugging Face "
                        "GPT-2 dir (default: the newest checkpoint under out/)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="text to continue (empty: start from end-of-text)")
    source.add_argument("--prompt-file", help="read the prompt from a file; - reads stdin")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (argmax)")
    p.add_argument("--top-k", type=int, help="sample from the K most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample from the nucleus of mass P, 0 < P <= 1")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, help="same seed, same text (default: a fresh one)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a sample when its text contains STRING (repeatable)")
    p.add_argument("--show-probs", type=int, metavar="K",
                   help="per token: its probability and the K most likely alternatives")
    p.add_argument("--json", action="store_true", help="one JSON object per generated token")
    p.add_argument("--interactive", action="store_true", help="a prompt loop on stdin")
    p.add_argument("--chat", action="store_true",
                   help="a multi-turn chat in the chat template (model/data/chat.py): each "
                        "line on stdin is a user message, each reply ends at the end of its turn")
    p.add_argument("--system", help="with --chat: the system message; with --interactive: "
                                    "text placed before the conversation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_kernel_arguments(p)
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for generation (default: the cores no other process is "
                        "busy on at start, model.runtime.default_threads)")
    add_steering_arguments(p)
    serve = p.add_argument_group("web playground and OpenAI-compatible API")
    serve.add_argument("--serve", action="store_true",
                       help="serve the playground page and the /v1 API instead of sampling "
                            "(the serve extra: pip install -e '.[serve]')")
    serve.add_argument("--host", default="127.0.0.1",
                       help="with --serve: the address to bind (default 127.0.0.1: this "
                            "machine only)")
    serve.add_argument("--port", type=int, default=8000, help="with --serve: the port")
    return p


def read_prompt(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    if args.prompt_file == "-":
        return stdin.read()
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise SamplingError(f"cannot read prompt file {args.prompt_file!r}: {exc.strerror}"
                            ) from None
    except UnicodeDecodeError:
        raise SamplingError(f"prompt file {args.prompt_file!r} is not UTF-8 text") from None


def visible(text: str) -> str:
    """Whitespace and control characters made visible: '·' space, '↵' newline, '→' tab."""
    return "".join(VISIBLE.get(c) or (c if c.isprintable() else repr(c)[1:-1]) for c in text)


def cell(text: str) -> str:
    text = visible(text) or "∅"
    return text if len(text) <= TOKEN_WIDTH else text[:TOKEN_WIDTH - 1] + "…"


class Printer:
    """Writes steps as they come: streamed text, a probability table, or JSON lines.

    Samples are generated side by side; the lowest unfinished one streams live and the others
    are held until it is done, so each sample prints in one piece.
    """

    def __init__(self, out: TextIO, prompt: str, num_samples: int, show_probs: int | None,
                 as_json: bool) -> None:
        self.out, self.prompt, self.n, self.show_probs = out, prompt, num_samples, show_probs
        self.mode = "json" if as_json else "table" if show_probs else "text"
        self.texts = [""] * num_samples
        self.printed = [0] * num_samples  # characters of each text already written
        self.done = [False] * num_samples
        self.started = [False] * num_samples
        self.current = 0

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def __call__(self, steps: Iterable[Step]) -> Iterator[Step]:
        if self.mode == "text":
            self.stream()  # the prompt, before the first token takes its time
        elif self.mode == "table":
            label = "sample " if self.n > 1 else ""
            self.write(f"{label}{'step':>5}  {'token':<{TOKEN_WIDTH}} {'prob':>6}  | top "
                       f"{self.show_probs}\n")
        for step in steps:
            self.texts[step.sample] += step.delta
            self.done[step.sample] = step.finished is not None
            if self.mode == "json":
                self.write(json.dumps(step.to_dict(), ensure_ascii=False) + "\n")
            elif self.mode == "table":
                self.write(self.table_row(step))
            else:
                self.stream()
            yield step
        if self.mode == "text":
            self.done = [True] * self.n  # max_new_tokens=0: the prompts alone
            self.stream()
        elif self.mode == "table":  # then each sample's whole text
            self.write("\n" + "".join(f"{self.prompt}{text}\n" + ("---------------\n" if self.n > 1
                                                                   else "") for text in self.texts))

    def stream(self) -> None:
        while self.current < self.n:
            i = self.current
            if not self.started[i]:
                self.started[i] = True
                self.write(self.prompt)
            self.write(self.texts[i][self.printed[i]:])
            self.printed[i] = len(self.texts[i])
            if not self.done[i]:
                return
            self.write("\n" + ("---------------\n" if self.n > 1 else ""))
            self.current += 1

    def table_row(self, step: Step) -> str:
        label = f"{step.sample:>6} " if self.n > 1 else ""
        alternatives = "  ".join(f"{cell(t):<{TOKEN_WIDTH}} {p:.3f}" for _, t, p in step.top)
        end = f"  [{step.finished}]" if step.finished else ""
        return (f"{label}{step.index:>5}  {cell(step.text):<{TOKEN_WIDTH}} {step.prob:>6.3f}  | "
                f"{alternatives}{end}\n")


@dataclass
class Conversation:
    """The context of an interactive session: an optional system prompt, then each exchange.

    A turn's prompt is the system text and the earlier exchanges, each on its own line(s),
    followed by the new user text and a newline; the model's reply continues from there.
    """

    system: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user text, reply)

    def prompt(self, user: str) -> str:
        parts = [self.system] if self.system else []
        for said, reply in self.turns:
            parts += [said, reply]
        return "\n".join([*parts, user]) + "\n"

    def add(self, user: str, reply: str) -> None:
        self.turns.append((user, reply))


def reply_steps(steps: Iterable[Step]) -> Iterator[Step]:
    """A reply's steps with the space the template puts before every reply left out."""
    first = True
    for step in steps:
        if first and step.delta:
            step = dataclasses.replace(step, delta=step.delta.lstrip(" "))
            first = False
        yield step


def chat(loaded: Pretrained, args: argparse.Namespace, run: Callable[..., str],
         stdin: TextIO, err: TextIO) -> None:
    """The --chat loop: a line in, a reply out, until end of input or 'exit'."""
    trained = loaded.chat_trained
    block_size = loaded.model.config.block_size
    history = ChatHistory(loaded.tokenizer, block_size,
                          min(args.max_new_tokens, block_size // 4), args.system)
    # A model never chat-trained rarely ends its turn itself: stop it when it starts the next.
    stop = list(args.stop) + ([] if trained else list(TURN_STOPS))
    if not trained:
        print("note: this model was not chat-trained; replies stop at the next 'User:' line",
              file=err)
    print("chat: type a message and press Enter; 'exit' or end of input quits", file=err)
    for turn, line in enumerate(read_lines(stdin, err)):
        if line.strip() in ("exit", "quit"):
            break
        if not line.strip():
            continue  # a blank line is not a message
        ids, dropped = history.prompt(line)
        if dropped:
            print(f"(the conversation outgrew the {block_size}-token context: dropped the "
                  f"{dropped} oldest exchange{'s' if dropped > 1 else ''})", file=err)
        seed = None if args.seed is None else args.seed + turn
        history.add_reply(run(ids, seed, stop).strip())


def read_lines(stdin: TextIO, err: TextIO) -> Iterator[str]:
    while True:
        err.write("> ")
        err.flush()
        line = stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def checked_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling settings, checked with the options that go with them: before the (slow)
    checkpoint load, so that a typo fails at once."""
    show = args.show_probs if args.show_probs is not None else 0
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, num_samples=args.num_samples,
                            seed=args.seed, stop=args.stop,
                            show_top=show or (5 if args.json else 0))
    if args.show_probs is not None and args.show_probs < 1:
        raise SamplingError(f"--show-probs must be >= 1, got {args.show_probs}")
    mode = "--chat" if args.chat else "--interactive"
    if args.chat and args.interactive:
        raise SamplingError("choose --chat (the chat template) or --interactive (plain text)")
    if (args.interactive or args.chat) and (args.prompt is not None
                                            or args.prompt_file is not None):
        raise SamplingError(f"{mode} reads its prompts from stdin; use --system for text "
                            "placed before the conversation")
    if (args.interactive or args.chat) and args.num_samples != 1:
        raise SamplingError(f"{mode} generates one reply at a time; drop --num-samples")
    if args.system is not None and not (args.interactive or args.chat):
        raise SamplingError("--system only applies with --chat or --interactive; put the text "
                            "in --prompt")
    return params


def interactive(args: argparse.Namespace, run: Callable[..., str], stdin: TextIO,
                err: TextIO) -> None:
    """The --interactive loop: each line continues the plain-text conversation so far."""
    conversation = Conversation(args.system or "")
    print("interactive: type a line and press Enter; 'exit' or end of input quits", file=err)
    for turn, line in enumerate(read_lines(stdin, err)):
        if line.strip() in ("exit", "quit"):
            break
        seed = None if args.seed is None else args.seed + turn
        reply = run(conversation.prompt(line), seed, args.stop or ["\n\n"])
        conversation.add(line, reply)


def main(argv: list[str] | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdin, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if args.serve:
        from model.cli.serve import run as serve  # FastAPI and uvicorn are loaded only here

        return serve(args.checkpoint, host=args.host, port=args.port, device=args.device,
                     dtype=args.dtype, threads=args.threads, err=err, pack=not args.no_pack,
                     quantize=args.quantize,
                     steer=args.steer, steer_layer=args.steer_layer,
                     steer_scale=args.steer_scale)
    params = checked_params(args)
    check_steering(args.steer, args.steer_layer, args.steer_scale)
    use_threads(args.threads)
    prompt = "" if args.interactive or args.chat else read_prompt(args, stdin)
    loaded = load_named_model(args.checkpoint, args.device, dtype=args.dtype,
                              pack=not args.no_pack, compile=args.compile,
                              quantize=args.quantize, err=err)
    steering = load_steering_option(args.steer, loaded.model, args.steer_layer,
                                    args.steer_scale, err)

    def run(text: str | list[int], seed: int | None, stop: list[str]) -> str:
        """Generate and print one reply (or --num-samples); sample 0's text."""
        printer = Printer(out, text if isinstance(text, str) and not args.interactive else "",
                          args.num_samples, args.show_probs, args.json)
        steps = generate(loaded.model, loaded.tokenizer, text, params=params, seed=seed,
                         stop=stop, warn=lambda message: print(f"warning: {message}", file=err),
                         fwd_hooks=steering.hooks() if steering else ())
        if args.chat:
            steps = reply_steps(steps)
        return "".join(step.delta for step in printer(steps) if step.sample == 0)

    if args.chat:
        chat(loaded, args, run, stdin, err)
    elif args.interactive:
        interactive(args, run, stdin, err)
    else:
        run(prompt, args.seed, args.stop)
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(lambda: main(argv))
