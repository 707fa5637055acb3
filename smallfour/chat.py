"""`smallfour chat MODEL.gguf`: an interactive chat in the terminal.

The model is loaded once; every turn sends the whole conversation through the chat
template, and llama.cpp's KV cache keeps the longest prefix it has already seen
(`Llama.generate` compares the new prompt with the tokens in the cache), so only the
new part of a growing conversation is evaluated. `/stats` shows how much was reused.

On a terminal the turn streams through a `rich.live.Live` view: thinking dimmed, the
answer as plain text, a footer with the token count. When the turn ends the view is
replaced by a one-line summary of the thinking ("thought for N tokens — /think to
show") and the answer rendered as Markdown. Without a terminal (stdin or stdout piped)
text is written as it arrives, nothing is redrawn.

Ctrl-C during a turn stops generation after the current token; the partial answer stays
in the conversation, marked `"interrupted": true` (the chat template ignores the mark,
`/save` keeps it), so "go on" continues from it. The next prompts carry a reply cut short
(Ctrl-C, max-tokens) as the token ids the model generated, not its text tokenized again, so
the KV cache is reused whole (see `send`). Ctrl-C at the prompt clears the line,
Ctrl-D or `/exit` leaves with exit code 0. Input history lives in
`$SMALLFOUR_HOME/chat_history`, or `$XDG_STATE_HOME/smallfour/chat_history`
(default `~/.local/state/smallfour/chat_history`).

Nothing typed at the prompt ends the REPL but Ctrl-D and `/exit`: a command that fails,
for any reason, prints one `error:` line and the conversation goes on. After every entry
the conversation is saved (temporary name, then renamed) to `chats/DATE-TIME-PID.json`
in the same state directory, so a crash, a closed terminal or a kill loses at most the
turn in progress; `chat --resume` continues the newest one, `chat --load FILE` any saved one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from smallfour.errors import SmallfourError
from smallfour.generation import (EFFORTS, PRESETS, ChatRequest, GenerationResult, continue_tokens, generated_reply,
                                  prompt_with_images, resolve_request, with_generated)
from smallfour.interrupt import Interrupt
from smallfour.messages import load_messages
from smallfour.model import Model
from smallfour.vision import ImageSpan, with_images

PROMPT = ">>> "
CONTINUATION = "... "
HISTORY_LENGTH = 2000
# Key of a cut-short reply's `GeneratedReply` in its message: kept in the session, never sent or saved.
GENERATED = "_generated"

HELP = [
    ("/effort none|high", "reasoning effort for the next turns (no argument: show it)"),
    ("/preset NAME", "switch preset: " + ", ".join(PRESETS) + " (no argument: list them)"),
    ("/system TEXT", "set the system prompt; `/system -` removes it; no argument: show it"),
    ("/set NAME VALUE", "temperature, top-p, top-k, max-tokens, seed, think-budget (no argument: show all)"),
    ("/think", "show the thinking of the last turn"),
    ("/stats", "last turn's speed, prompt tokens reused from the cache, context used"),
    ("/retry", "answer your last message again (its reply is replaced)"),
    ("/undo", "take back your last message and its reply"),
    ("/reset", "forget the conversation (the system prompt stays)"),
    ("/save FILE", "write the conversation as a JSON messages list (`smallfour run --messages FILE` reads it)"),
    ("/load FILE", "replace the conversation with a JSON messages list"),
    ("/image PATH", "attach an image to your next message (repeat for several)"),
    ("/help", "this list"),
    ("/exit", "leave (Ctrl-D does too)"),
]
COMMANDS = [usage.split()[0] for usage, _ in HELP] + ["/quit"]
MULTILINE_HELP = ('End a line with \\ to continue it, or wrap several lines in """ … """. '
                  "Ctrl-C stops a reply, Ctrl-D leaves. A message starting with / is written //.")

def _number(kind: type, low: float | None = None, high: float | None = None, optional: bool = False):
    def parse(text: str):
        if optional and text.lower() in ("none", "off", "default"):
            return None
        try:
            value = kind(text)
        except ValueError:
            raise SmallfourError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise SmallfourError(f"{text} is out of range: {bounds}")
        return value

    return parse


# /set NAME → (Sampling field or "think_budget", parser)
SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temperature": ("temperature", _number(float, 0.0)),
    "top-p": ("top_p", _number(float, 0.0, 1.0)),
    "top-k": ("top_k", _number(int, 0)),
    "max-tokens": ("max_tokens", _number(int, 1)),
    "seed": ("seed", _number(int, optional=True)),
    "think-budget": ("think_budget", _number(int, 1, optional=True)),
}


# --------------------------------------------------------------------------- state


@dataclass
class TurnStats:
    """One turn, as `/stats` reports it."""

    result: GenerationResult
    effort: str
    reused: int  # prompt tokens taken from the KV cache
    evaluated: int  # prompt tokens llama.cpp had to evaluate
    interrupted: bool
    context_used: int
    context_size: int


@dataclass
class Session:
    model: Model | None
    preset: str = "instant"
    effort: str | None = None  # None: the preset's
    system: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # Sampling fields and think_budget
    messages: list[dict[str, Any]] = field(default_factory=list)  # without the system prompt
    last: TurnStats | None = None
    turns: int = 0
    images: list[str] = field(default_factory=list)  # attached with /image, sent with the next message
    model_path: Path | None = None  # where /image looks for the vision projector
    mmproj: Path | None = None  # --mmproj
    autosave: Path | None = None  # where the conversation is saved after every entry

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as they are sent and saved (system prompt first, the session's own keys left out)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{k: v for k, v in m.items() if k != GENERATED} for m in self.messages]

    def prompt(self, request: ChatRequest) -> tuple[list[int], list[int], list[ImageSpan]]:
        """The template's tokens for `request`, and the tokens to evaluate: the same, but with each
        cut-short reply's generated ids in place of its text's (see `send`), and where the images sit."""
        _, rendered, spans = prompt_with_images(self.model, request)
        tokens, spans = with_generated(rendered, spans, (m[GENERATED] for m in self.messages if GENERATED in m))
        return rendered, tokens, spans

    def request(self) -> ChatRequest:
        overrides = {k: v for k, v in self.overrides.items() if k != "think_budget"}
        return resolve_request(self.conversation(), preset=self.preset, effort=self.effort,
                               think_budget=self.overrides.get("think_budget"), **overrides)


def state_dir() -> Path:
    """Where chat keeps its history and autosaved conversations."""
    home = os.environ.get("SMALLFOUR_HOME")
    if home:
        return Path(home).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state).expanduser() / "smallfour"


def history_file() -> Path:
    return state_dir() / "chat_history"


def chats_dir() -> Path:
    return state_dir() / "chats"


def new_autosave_path() -> Path:
    return chats_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"


def last_autosave() -> Path:
    """The newest autosaved conversation (`chat --resume`)."""
    saved = sorted(chats_dir().glob("*.json"), key=lambda p: p.stat().st_mtime) if chats_dir().is_dir() else []
    if not saved:
        raise SmallfourError(f"no saved conversation to resume in {chats_dir()}")
    return saved[-1]


# --------------------------------------------------------------------------- input


def read_entry(read_line: Callable[[str], str]) -> str:
    """One user entry, possibly several lines: `\\` at a line's end continues it, `\"\"\"` opens a block.

    Raises EOFError (Ctrl-D) and KeyboardInterrupt (Ctrl-C) from `read_line`.
    """
    first = read_line(PROMPT)
    if first.lstrip().startswith('"""'):
        body = first.lstrip()[3:]
        if body.rstrip().endswith('"""'):
            return body.rstrip()[:-3]
        lines = [body] if body else []
        while True:
            line = read_line(CONTINUATION)
            if line.rstrip().endswith('"""'):
                tail = line.rstrip()[:-3]
                if tail:
                    lines.append(tail)
                return "\n".join(lines)
            lines.append(line)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line(CONTINUATION))
    return "\n".join(lines)


class LineEditor:
    """readline where it exists: editing, history kept in a file, Tab completes commands."""

    def __init__(self, path: Path | None):
        self.path = path
        self.readline = None
        if not sys.stdin.isatty():
            return
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input()
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LENGTH)
        if path is not None and path.is_file():
            try:
                readline.read_history_file(str(path))
            except OSError:
                pass
        readline.set_completer(self._complete)
        readline.set_completer_delims(" \t\n")
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")

    def _complete(self, text: str, state: int) -> str | None:
        if self.readline is None or not self.readline.get_line_buffer().startswith("/"):
            return None
        matches = [c + " " for c in COMMANDS if c.startswith(text)]
        return matches[state] if state < len(matches) else None

    def read_line(self, prompt: str) -> str:
        if self.readline is not None and sys.stdout.isatty():
            # \001 … \002 tell readline the escape codes take no room on the line.
            prompt = f"\001\033[1;32m\002{prompt}\001\033[0m\002"
        return input(prompt)

    def save(self) -> None:
        if self.readline is None or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(self.path))
        except OSError:
            pass


# --------------------------------------------------------------------------- one turn


class _TurnView:
    """What a turn shows while it streams: the tail of thinking (dim) and answer, and a footer."""

    def __init__(self) -> None:
        self.reasoning = ""
        self.content = ""
        self.tokens = 0
        self.first_token_at: float | None = None
        self.stopping = False

    def on_text(self, channel: str, text: str) -> None:
        if channel == "reasoning":
            self.reasoning += text
        else:
            self.content += text

    def count_token(self) -> None:
        self.tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def footer(self) -> Text:
        if self.stopping:
            return Text("stopping…", style="yellow")
        if self.first_token_at is None:
            return Text("reading the prompt… (Ctrl-C stops)", style="dim")
        elapsed = time.perf_counter() - self.first_token_at
        rate = f", {(self.tokens - 1) / elapsed:.1f} tok/s" if elapsed > 0.2 and self.tokens > 1 else ""
        return Text(f"{self.tokens} tokens{rate} (Ctrl-C stops)", style="dim")

    def __rich_console__(self, console: Console, options):
        height = max(console.size.height - 3, 2)
        keep = options.max_width * height  # characters enough to fill the screen
        parts = []
        if self.reasoning:
            parts.append(Text(self.reasoning[-keep:], style="dim"))
        if self.content:
            parts.append(Text(self.content[-keep:]))
        if parts:
            lines = console.render_lines(Group(*parts), options.update(height=None), pad=False)
            for line in lines[-height:]:
                yield from line
                yield Segment.line()
        yield self.footer()


def run_turn(session: Session, console: Console, text: str, *, live: bool) -> None:
    """Send one user message (with the images attached since the last one), stream the reply, keep both."""
    send(session, console, {"role": "user", "content": with_images(text, session.images)}, live=live)
    session.images = []  # they went with this message


def send(session: Session, console: Console, message: dict[str, Any], *, live: bool) -> None:
    """Append `message`, stream the model's reply, keep it in the conversation (or drop both on an error)."""
    session.messages.append(message)
    model = session.model
    try:
        request = session.request()
        rendered, tokens, spans = session.prompt(request)
    except SmallfourError:
        session.messages.pop()
        raise
    view = _TurnView()
    result: GenerationResult | None = None
    streamed = {"channel": None}

    def write_plain(channel: str, piece: str) -> None:
        view.on_text(channel, piece)
        if channel != streamed["channel"] and streamed["channel"] is not None:
            console.file.write("\n")
        streamed["channel"] = channel
        console.print(piece, style="dim" if channel == "reasoning" else None, end="", markup=False,
                      highlight=False, soft_wrap=True)
        console.file.flush()

    try:
        with Interrupt() as interrupt:
            def should_stop() -> bool:
                view.count_token()
                view.stopping = interrupt.requested
                return interrupt.requested

            display = Live(view, console=console, transient=True, refresh_per_second=8) if live else None
            try:
                if display is not None:
                    display.start()
                result = continue_tokens(model, tokens, request, spans=spans,
                                         on_text=view.on_text if live else write_plain, should_stop=should_stop)
            finally:
                if display is not None:
                    display.stop()
            interrupted = interrupt.requested
    except KeyboardInterrupt:
        # A second Ctrl-C while llama.cpp was busy: the result is lost, keep what was streamed.
        # (The next prompt trims the KV cache to what the model's token list says it holds.)
        interrupted = True
        result = GenerationResult(content=view.content, reasoning_content=view.reasoning,
                                  completion_tokens=view.tokens, prompt_tokens=len(model.tokens))
    except SmallfourError:
        session.messages.pop()
        raise
    if not live and streamed["channel"] is not None:
        console.file.write("\n")

    session.turns += 1
    reused = result.cached_tokens
    session.last = TurnStats(result, request.effort or "none", reused, result.prompt_tokens - reused, interrupted,
                             len(model.tokens), model.n_ctx)
    _show_result(console, session.last, request, rendered=live)

    if not result.content and not result.reasoning_content:
        # The template refuses an empty assistant message: forget the question too.
        session.messages.pop()
        console.print("(nothing generated: the message was not kept)", style="dim")
        return
    reply: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.reasoning_content:
        reply["reasoning_content"] = result.reasoning_content
    if interrupted:
        reply["interrupted"] = True
    if (interrupted or result.finish_reason == "length") and result.tokens:
        # A reply cut short (Ctrl-C, max-tokens) was read by the model as the ids it generated, and its
        # text does not always tokenize back into them (a character cut in half, a word split unusually,
        # a thought left open; random weights nearly always): a prompt built from the text would match
        # the cache only up to the reply, and everything after it would be read again. So the next
        # prompts carry these ids in place of the text's tokens. All else stays what mistral-common
        # encodes for the saved conversation, `</s>` after the reply included: the model never read one
        # there (it was stopped, it did not finish), but mistral-common closes every earlier assistant
        # message with it, and it comes after the cached part, so it costs nothing. A thought cut short
        # keeps its `[THINK]` without `[/THINK]`, as mistral-common writes a thinking chunk with
        # `closed: false`. A reply that ended with `</s>` is left as mistral-common re-tokenizes its text.
        # (After a second Ctrl-C the ids are lost with the result: the text is all there is.)
        with contextlib.suppress(SmallfourError):  # (an image gone since: the reply is kept as text)
            generated = generated_reply(model, request, rendered, reply, result.tokens)
            if generated is not None:
                reply[GENERATED] = generated
    session.messages.append(reply)


def _show_result(console: Console, stats: TurnStats, request: ChatRequest, *, rendered: bool) -> None:
    result = stats.result
    if result.reasoning_content:
        console.print(Text(f"(thought for {result.reasoning_tokens or stats.result.completion_tokens} tokens"
                           " — /think to show)", style="dim italic"))
    if rendered and result.content.strip():
        console.print(Markdown(result.content))
    if stats.interrupted:
        console.print(Text(f"[interrupted after {result.completion_tokens} tokens; the partial answer is kept]",
                           style="yellow"))
    elif result.finish_reason == "length":
        if stats.context_used >= stats.context_size - 1:
            console.print(Text("[stopped: the context is full; /reset, or /save and /load a shorter "
                               "conversation]", style="yellow"))
        else:
            console.print(Text(f"[stopped at max-tokens ({request.sampling.max_tokens}); "
                               "/set max-tokens N to allow more]", style="yellow"))
    console.print()


# --------------------------------------------------------------------------- commands


def save_conversation(session: Session, path: Path) -> int:
    """Write the conversation (system prompt first) as a JSON messages list; complete or not at all."""
    messages = session.conversation()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        temporary.write_text(json.dumps(messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise SmallfourError(f"cannot write {path}: {exc.strerror or exc}") from None
    return len(messages)


def autosave(session: Session) -> None:
    """Save the conversation to the session's autosave file, if it has one and something to save."""
    if session.autosave is None or not session.conversation():
        return
    session.autosave.parent.mkdir(parents=True, exist_ok=True)
    save_conversation(session, session.autosave)


def load_conversation(session: Session, path: Path) -> int:
    data = load_messages(path)
    if data and data[0]["role"] == "system":
        content = data[0].get("content")
        session.system = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        data = data[1:]
    else:
        session.system = None
    session.messages = [dict(m) for m in data]
    session.last = None
    return len(data)


def show_stats(session: Session, console: Console) -> None:
    model = session.model
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    last = session.last
    if last is None:
        grid.add_row("last turn", "none yet")
    else:
        r = last.result
        prompt_rate = ""
        if r.prompt_ms > 0 and last.evaluated:
            prompt_rate = f" ({last.evaluated / (r.prompt_ms / 1000):.1f} tok/s)"
        grid.add_row("prompt", f"{r.prompt_tokens} tokens: {last.reused} reused from the cache, "
                               f"{last.evaluated} evaluated in {r.prompt_ms:.0f} ms{prompt_rate}")
        rate = r.as_json()["timings"]["predicted_per_second"]
        ending = "interrupted" if last.interrupted else {"stop": "finished", "length": "hit the limit"}.get(
            r.finish_reason, r.finish_reason)
        grid.add_row("reply", f"{r.completion_tokens} tokens ({r.reasoning_tokens} thinking) in "
                              f"{r.predicted_ms / 1000:.2f} s: {rate:.1f} tok/s, {ending}")
        grid.add_row("effort", f"{last.effort} (last turn)")
    request = session.request()
    used, size = len(model.tokens), model.n_ctx
    context = f"{used} / {size} tokens in the KV cache ({100 * used / size:.0f}%)"
    if session.messages:
        try:
            context += f"; the conversation is {len(session.prompt(request)[1])} tokens"
        except SmallfourError:
            pass
    grid.add_row("context", context)
    turns = f"{session.turns} turn{'s' if session.turns != 1 else ''}"
    grid.add_row("session", f"{turns}, {len(session.conversation())} messages; preset {session.preset}, "
                            f"effort {request.effort}")
    console.print(grid)


def show_settings(session: Session, console: Console) -> None:
    request = session.request()
    s = request.sampling
    values = {"temperature": s.temperature, "top-p": s.top_p, "top-k": s.top_k, "max-tokens": s.max_tokens,
              "seed": s.seed if s.seed is not None else "random", "think-budget": request.think_budget or "none"}
    grid = Table.grid(padding=(0, 2))
    for name, value in values.items():
        field_name = SETTINGS[name][0]
        grid.add_row(name, str(value), "(set)" if field_name in session.overrides else f"({session.preset} preset)")
    console.print(f"preset {session.preset}, effort {request.effort}", highlight=False)
    console.print(grid)


def run_command(session: Session, console: Console, line: str) -> bool:
    """Do one /command; False when the REPL should end."""
    name, _, arg = line.strip().partition(" ")
    name, arg = name.lower(), arg.strip()
    note = _noter(console)
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        grid = Table.grid(padding=(0, 2))
        for usage, what in HELP:
            grid.add_row(Text(usage, style="bold"), what)
        console.print(grid)
        console.print(MULTILINE_HELP, style="dim", highlight=False, markup=False)
    elif name == "/effort":
        if arg:
            value = arg.lower()
            if value not in EFFORTS:
                raise SmallfourError(f"reasoning effort {arg!r}: Mistral Small 4 accepts {' or '.join(EFFORTS)}")
            session.effort = value
        note(f"effort {session.request().effort}")
    elif name == "/preset":
        if not arg:
            for preset_name, preset in PRESETS.items():
                mark = "*" if preset_name == session.preset else " "
                note(f"{mark} {preset_name:<13} {preset.description}")
            return True
        if arg not in PRESETS:
            raise SmallfourError(f"unknown preset {arg!r}; choose one of {', '.join(PRESETS)}")
        session.preset, session.effort = arg, None
        note(f"preset {arg}: effort {session.request().effort}, {PRESETS[arg].description}")
    elif name == "/system":
        if not arg:
            note(f"system prompt: {session.system}" if session.system else "no system prompt")
        elif arg == "-":
            session.system = None
            note("system prompt removed")
        else:
            session.system = arg
            note("system prompt set (the next turn re-reads the whole conversation)")
    elif name == "/set":
        if not arg:
            show_settings(session, console)
            return True
        key, _, value = arg.partition(" ")
        key = key.lower().replace("_", "-")
        if key not in SETTINGS or not value.strip():
            raise SmallfourError(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}")
        field_name, parse = SETTINGS[key]
        parsed = parse(value.strip())
        if parsed is None:
            session.overrides.pop(field_name, None)
        else:
            session.overrides[field_name] = parsed
        note(f"{key} {parsed if parsed is not None else 'back to the preset'}")
    elif name == "/think":
        thinking = session.last.result.reasoning_content if session.last else ""
        if thinking:
            console.print(Text(thinking, style="dim"))
        else:
            note("no thinking in the last turn" + ("" if session.request().effort == "high"
                                                   else " (/effort high turns thinking on)"))
    elif name == "/stats":
        show_stats(session, console)
    elif name in ("/retry", "/undo"):
        start = _last_user_message(session, name)
        message, dropped = session.messages[start], len(session.messages) - start
        session.messages, session.last = session.messages[:start], None
        if name == "/undo":
            note(f"took back your last message and its reply ({dropped} message{'s' if dropped != 1 else ''}); "
                 f"{len(session.messages)} left")
        else:
            send(session, console, message, live=_live(console))
    elif name == "/reset":
        session.messages, session.last = [], None
        note("conversation cleared" + (" (system prompt kept)" if session.system else ""))
    elif name == "/save":
        if not arg:
            raise SmallfourError("usage: /save FILE")
        path = Path(arg).expanduser()
        note(f"saved {save_conversation(session, path)} messages to {path}")
    elif name == "/load":
        if not arg:
            raise SmallfourError("usage: /load FILE")
        path = Path(arg).expanduser()
        count = load_conversation(session, path)
        note(f"loaded {count} messages from {path}" + (" and its system prompt" if session.system else ""))
    elif name == "/image":
        if not arg:
            raise SmallfourError("usage: /image PATH")
        image = attach_image(session, arg)
        count = len(session.images)
        note(f"attached {image.label} ({image.width}×{image.height} px, {image.n_tokens} tokens); "
             f"{'it goes' if count == 1 else f'{count} images go'} with your next message")
    else:
        raise SmallfourError(f"unknown command {name}; /help lists them")
    return True


def _last_user_message(session: Session, command: str) -> int:
    """Where the last exchange starts: the index of the user's last message."""
    for index in range(len(session.messages) - 1, -1, -1):
        if session.messages[index].get("role") == "user":
            return index
    raise SmallfourError(f"{command}: no message of yours in the conversation yet")


def attach_image(session: Session, source: str):
    """Check an image and queue it for the next message; the projector loads on first use."""
    from smallfour.vision import attach_projector, find_mmproj, open_projector, prepare_all

    source = str(Path(source).expanduser()) if not source.startswith("data:") else source
    if session.model.projector is None:
        if session.model_path is None:
            raise SmallfourError("this session has no model file to find a vision projector beside")
        path = find_mmproj(session.model_path, session.mmproj)
        attach_projector(session.model, open_projector(session.model, path))
    image = prepare_all([source], session.model.projector.geometry)[0]
    session.images.append(source)
    return image


def _noter(console: Console) -> Callable[[str], None]:
    def note(text: str) -> None:
        console.print(Text(text, style="cyan"), soft_wrap=not console.is_terminal)

    return note


# --------------------------------------------------------------------------- the loop


def repl(session: Session, console: Console, editor: LineEditor) -> None:
    """Read entries until Ctrl-D or /exit; no entry ends it otherwise, and each one is autosaved."""
    live = _live(console)
    while True:
        try:
            entry = read_entry(editor.read_line)
        except KeyboardInterrupt:
            console.print()  # Ctrl-C at the prompt drops what was typed
            continue
        except EOFError:
            console.print()
            return
        except UnicodeDecodeError:
            _error(console, "the input is not UTF-8 text; the line was dropped")
            continue
        if not entry.strip():
            continue
        try:
            if entry.startswith("/") and not entry.startswith("//"):
                if not run_command(session, console, entry):
                    return
            else:
                run_turn(session, console, entry[1:] if entry.startswith("//") else entry, live=live)
        except SmallfourError as exc:
            _error(console, str(exc))
        except KeyboardInterrupt:  # Ctrl-C outside generation (a command, the final rendering)
            console.print(Text("[interrupted]", style="yellow"))
        except Exception as exc:  # noqa: BLE001 - a bug must not take the conversation with it
            _error(console, f"{entry.split()[0] if entry.startswith('/') else 'the turn'} failed "
                            f"({type(exc).__name__}: {exc}); the conversation is kept")
        try:
            autosave(session)
        except (SmallfourError, OSError) as exc:
            _error(console, f"autosave failed: {exc}")


def _live(console: Console) -> bool:
    """Replies render live (a footer, Markdown) on a real terminal; elsewhere they stream as plain text."""
    return console.is_terminal and not console.is_dumb_terminal


def _error(console: Console, message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=not console.is_terminal)
