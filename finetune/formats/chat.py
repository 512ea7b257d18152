"""Chat and instruction records: their formats, the chat template, and rendering to token ids + a loss mask.

Three record formats are read (docs/chat.md has them in full):

    messages            {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    prompt_completion   {"prompt": "...", "completion": "..."}
    instruction         {"instruction": "...", "input": "...", "output": "..."}   (Alpaca)

A conversation is rendered with the chat template (the tokenizer's own, --chat-template FILE, or
DEFAULT_CHAT_TEMPLATE) exactly as transformers' apply_chat_template renders it, and tokenized like every
other text of prepare_data.py (the tokenizer's ids, no special tokens added). Trained are each assistant
turn's tokens after the generation prompt, up to and including the turn's end token (the last special
token of the turn): the reply and its end-of-turn token, never the template's role headers nor the user's
or system's words. Where a turn starts and ends is found in tokens, not characters: the generation
prompt of the conversation up to that turn must tokenize to a prefix of the whole conversation's ids
(prefix stability), which is exactly what makes inference (prompt + generated reply) see the tokens
training saw. A template for which that fails is refused, naming the record.

Prompt/completion records are joined the way TRL's SFTTrainer joins them: the tokens of
prompt + completion + eos text, trained from where they leave the prompt's own tokens; no text added.

The mask is one uint8 per token: bit 0 (TRAIN) = a training target, bit 1 (START) = the example's first
token (docs/chat.md, "Token files": the contract with the training side).
"""
from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.core.errors import UserError, first_line

CHAT_FORMATS = ("messages", "prompt_completion", "instruction", "preference")
FORMAT_FLAG_VALUES = ("auto", *CHAT_FORMATS, "text")  # --chat-format; "text": plain records (--text-field)
FORMAT_FIELDS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
                 "instruction": ("instruction", "output"), "preference": ("chosen", "rejected")}
FORMAT_NAMES = {"messages": "a conversation (messages)", "prompt_completion": "prompt/completion",
                "instruction": "instruction/input/output",
                "preference": "a preference pair (prompt/chosen/rejected)"}
ROLES = ("system", "user", "assistant")
TRAIN, START, REJECTED = 1, 2, 4  # mask bits (REJECTED: preference pairs, finetune/data/pairs.py)

# The template for tokenizers without one (GPT-2). It adds no token to the vocabulary: role headers are
# plain text ("User:\n") and the end-of-text token ends every turn, so the model learns to stop after a
# reply. The reply sits in {% generation %} ... {% endgeneration %}, so transformers'
# return_assistant_tokens_mask and TRL's assistant_only_loss mark the same tokens this module trains.
# Content may be a string or a list of text parts (joined with nothing between them).
DEFAULT_CHAT_TEMPLATE = """\
{%- for message in messages -%}
{%- if message['content'] is string -%}
{%- set content = message['content'] -%}
{%- else -%}
{%- set content = message['content'] | map(attribute='text') | join('') -%}
{%- endif -%}
{%- if message['role'] == 'assistant' -%}
{{- 'Assistant:\\n' -}}
{%- generation -%}
{{- content + eos_token -}}
{%- endgeneration -%}
{%- else -%}
{{- message['role'] | capitalize + ':\\n' + content + eos_token -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- 'Assistant:\\n' -}}
{%- endif -%}
"""

# The conversation every template is tried on before any record is read.
PROBE = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "How is the sea?"},
         {"role": "assistant", "content": "The sea is calm."}, {"role": "user", "content": "And the wind?"},
         {"role": "assistant", "content": "A quiet wind, from the west."}]


# -----------------------------------------------------------------------------
# Formats


def format_of(obj: dict) -> str | None:
    """The chat format a record's fields say it is in, or None (a plain text record). A record with "chosen"
    or "rejected" is a preference pair (one that lacks a field is refused when it is read)."""
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    for fmt, names in FORMAT_FIELDS.items():
        if all(name in obj for name in names):
            return fmt
    return None


class FormatChooser:
    """The one format of a run: forced by --chat-format, or detected from the first chat record and then
    held to. A record in another format is refused (unless --chat-format messages reads every record as a
    conversation), naming both records."""

    def __init__(self, flag: str = "auto"):
        self.flag = flag
        self.first: tuple[str, str] | None = None  # (format, "file line N") of the first record

    def choose(self, obj: dict, where: str) -> str | None:
        """The format to read `obj` as; None: a plain text record (only when no chat record came first)."""
        found = format_of(obj)
        if self.flag == "text":
            return None
        if self.flag == "messages":
            if found is None:
                raise UserError(f"{where}: the record has none of the fields of a chat record ({fields_help()}). "
                                "HINT: fix the record, or leave out --chat-format messages for plain text")
            return found
        if self.flag in CHAT_FORMATS and found != self.flag:
            what = f"it is {FORMAT_NAMES[found]}" if found else "it has none of its fields"
            raise UserError(f"{where}: --chat-format {self.flag} needs the fields "
                            f"{' and '.join(map(repr, FORMAT_FIELDS[self.flag]))}, but {what}. HINT: pass "
                            "--chat-format messages to read every chat record as a conversation, or fix the record")
        if self.first is None:
            self.first = (found, where)
            return found
        first, first_where = self.first
        if found != first:
            what, was = (FORMAT_NAMES.get(kind, f"not a chat record (no {fields_help()})") for kind in (found, first))
            raise UserError(f"{where}: this record is {what}, but {first_where} is {was}; one run "
                            "takes one format. HINT: pass --chat-format messages to read every chat record as a "
                            "conversation (a prompt/completion or instruction record becomes a user and an "
                            "assistant turn), or prepare the files separately")
        return found


def fields_help() -> str:
    return "'messages', 'prompt' + 'completion', 'instruction' + 'output', or 'prompt' + 'chosen' + 'rejected'"


# -----------------------------------------------------------------------------
# Records -> examples, with every check on the way


@dataclass
class Conversation:
    """Messages {role, content: str}; `trained` marks the turns whose reply is trained (the assistant's)."""
    messages: list[dict]
    trained: list[bool]


@dataclass
class PromptCompletion:
    prompt: str
    completion: str


@dataclass
class PreferencePair:
    """A prompt and two completions, the chosen one preferred: strings (TRL's standard format) or, when
    `conversational`, message lists (the prompt's turns; the completions' assistant turns)."""
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def example_of(obj: dict, fmt: str, where: str, as_messages: bool = False) -> Conversation | PromptCompletion:
    """The example a record holds, read as `fmt`; as_messages turns prompt/completion into turns."""
    if fmt == "preference":
        return preference_pair(obj, where)
    if fmt == "messages":
        return conversation(obj["messages"], where, "messages")
    if fmt == "instruction":
        instruction = text_field(obj, "instruction", where)
        extra = text_field(obj, "input", where, optional=True)
        user = instruction + "\n\n" + extra if extra else instruction
        return Conversation([{"role": "user", "content": user},
                             {"role": "assistant", "content": text_field(obj, "output", where)}], [False, True])
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt/completion
        first = conversation(prompt, where, "prompt")
        second = conversation(completion, where, "completion")
        return Conversation(first.messages + second.messages, [False] * len(first.messages) + second.trained)
    prompt, completion = text_field(obj, "prompt", where), text_field(obj, "completion", where)
    if as_messages:
        return Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                            [False, True])
    return PromptCompletion(prompt, completion)


def preference_pair(obj: dict, where: str) -> PreferencePair:
    """TRL's preference formats: standard (prompt, chosen and rejected strings) or conversational (prompt a
    list of messages, chosen and rejected the assistant turn(s); or, without a prompt, chosen and rejected
    whole conversations that differ only in their last assistant turns). Every field present and not empty,
    one style in the record, completions of assistant turns, and two different completions."""
    missing = [name for name in ("chosen", "rejected") if is_empty(obj.get(name))]
    conversational = isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list) or \
        isinstance(obj.get("prompt"), list)
    if "prompt" in obj or not conversational:
        missing = [name for name in ("prompt", "chosen", "rejected") if is_empty(obj.get(name))]
    if missing:
        raise UserError(f"{where}: the preference pair has {'no or an empty ' + ' and no '.join(map(repr, missing))} "
                        "field. HINT: each pair needs a prompt, a chosen and a rejected completion, none of them "
                        "empty (docs/preference.md)")
    if not conversational:
        pair = PreferencePair(*(text_field(obj, name, where) for name in ("prompt", "chosen", "rejected")))
    elif "prompt" not in obj:
        pair = implicit_prompt_pair(obj, where)
    else:
        styles = {name: "a list of messages" if isinstance(obj[name], list) else json_kind(obj[name])
                  for name in ("prompt", "chosen", "rejected")}
        if len(set(styles.values())) > 1:
            raise UserError(f"{where}: the pair mixes formats ({', '.join(f'{k} is {v}' for k, v in styles.items())})."
                            " HINT: give prompt, chosen and rejected all as strings (standard) or all as lists of "
                            "messages (conversational)")
        pair = PreferencePair(conversation(obj["prompt"], where, "prompt").messages,
                              assistant_turns(obj["chosen"], where, "chosen"),
                              assistant_turns(obj["rejected"], where, "rejected"))
    if pair.chosen == pair.rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same, so the pair prefers nothing. HINT: fix or "
                        "drop the pair; a preference pair needs two different completions")
    return pair


def is_empty(value) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def assistant_turns(messages, where: str, name: str) -> list[dict]:
    """A completion of a conversational pair: assistant messages only."""
    checked = conversation(messages, where, name).messages
    for i, message in enumerate(checked):
        if message["role"] != "assistant":
            raise UserError(f"{where}: {name}[{i}] has the role {message['role']!r}, but a completion is what the "
                            "assistant says. HINT: put the user's and system's turns in 'prompt', and only "
                            f"assistant turns in {name!r}")
    return checked


def implicit_prompt_pair(obj: dict, where: str) -> PreferencePair:
    """chosen and rejected as whole conversations: the prompt is what precedes their last assistant turn, and
    must be the same in both."""
    chosen, rejected = (conversation(obj[name], where, name).messages for name in ("chosen", "rejected"))
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message of {name!r} has the role {messages[-1]['role']!r}, not "
                            "assistant, so it holds no completion. HINT: end chosen and rejected with the "
                            "assistant's answer, or give the prompt as its own 'prompt' field")
    if chosen[:-1] != rejected[:-1]:
        at = next(i for i, (a, b) in enumerate(zip(chosen + [None], rejected + [None])) if a != b)
        raise UserError(f"{where}: the prompts of 'chosen' and 'rejected' differ (at message {at}), so the two "
                        "answers do not reply to the same conversation. HINT: make every message but the last "
                        "assistant turn the same in both, or give the shared prompt as its own 'prompt' field")
    return PreferencePair(chosen[:-1], chosen[-1:], rejected[-1:])


def text_field(obj: dict, name: str, where: str, optional: bool = False) -> str:
    value = obj.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} is {json_kind(value)}, not text. HINT: give {name!r} as a "
                        "string" + (" (or leave it out)" if optional else ""))
    check_text(value, where, repr(name))
    return value


def conversation(messages, where: str, name: str) -> Conversation:
    if not isinstance(messages, list):
        raise UserError(f"{where}: {name!r} is {json_kind(messages)}, not a list of messages. HINT: give "
                        f"{name!r} as a list such as [{{\"role\": \"user\", \"content\": \"...\"}}, "
                        "{\"role\": \"assistant\", \"content\": \"...\"}]")
    checked = [message_of(m, f"{where}: {name}[{i}]") for i, m in enumerate(messages)]
    return Conversation(checked, [m["role"] == "assistant" for m in checked])


def message_of(message, where: str) -> dict:
    """{role, content: str} of one message (text parts joined), or a UserError saying what is wrong."""
    if not isinstance(message, dict):
        raise UserError(f"{where} is {json_kind(message)}, not a message object. HINT: each message is an "
                        "object such as {\"role\": \"user\", \"content\": \"...\"}")
    missing = [key for key in ("role", "content") if message.get(key) is None]
    if missing:
        raise UserError(f"{where} has no {' and no '.join(map(repr, missing))}. HINT: each message needs a "
                        f"role ({', '.join(ROLES)}) and its text as content")
    role = message["role"]
    if role not in ROLES:
        raise UserError(f"{where} has the role {role!r}, which is not one of {', '.join(ROLES)}. HINT: use "
                        "system, user or assistant (tool calls and other roles are not read)")
    return {"role": role, "content": content_text(message["content"], where)}


def content_text(content, where: str) -> str:
    """A message's text: a string, or a list of text parts ({"type": "text", "text": ...}) joined."""
    if isinstance(content, str):
        check_text(content, where, "content")
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a part of type {kind!r}" if isinstance(kind, str) and kind != "text" else json_kind(part)
                raise UserError(f"{where} content[{i}] is {what}, not text. HINT: only text is read; give "
                                "content as a string or as text parts {\"type\": \"text\", \"text\": \"...\"}")
            check_text(part["text"], where, f"content[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise UserError(f"{where} has content that is {json_kind(content)}, not text. HINT: give content as a string "
                    "or as a list of text parts")


def check_text(text: str, where: str, what: str) -> None:
    """A lone surrogate (JSON's \\ud800) is no text any tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{where}: {what} holds a lone surrogate (U+{ord(text[exc.start]):04X}), which is not "
                        "text. HINT: fix the text's encoding (an escape such as \\ud800 must be half of a pair)") \
            from None


def json_kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), f"a {type(value).__name__}")


# -----------------------------------------------------------------------------
# The template


@dataclass
class ChatTemplate:
    text: str
    source: str  # "tokenizer", "default" or the path of the --chat-template file


def choose_template(tokenizer, template_file: str | None) -> ChatTemplate:
    """--chat-template FILE, else the tokenizer's own template, else DEFAULT_CHAT_TEMPLATE."""
    if template_file:
        return ChatTemplate(read_template_file(Path(template_file)), template_file)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the "default" one
        own = own.get("default")
    if own:
        return ChatTemplate(own, "tokenizer")
    return ChatTemplate(DEFAULT_CHAT_TEMPLATE, "default")


def read_template_file(path: Path) -> str:
    hint = "HINT: give --chat-template a Jinja chat template file (e.g. a copy of a tokenizer's chat_template)"
    if not path.exists():
        raise UserError(f"--chat-template {path} does not exist. {hint}")
    if not path.is_file():
        raise UserError(f"--chat-template {path} is not a file. {hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--chat-template {path} is not UTF-8 text. {hint}") from None
    except OSError as exc:
        raise UserError(f"--chat-template {path} cannot be read ({exc.strerror}). {hint}") from None
    if not text.strip():
        raise UserError(f"--chat-template {path} is empty. {hint}")
    return text


def describe(template: ChatTemplate) -> str:
    return {"tokenizer": "the tokenizer's chat template", "default": "the default chat template"}.get(
        template.source, f"the chat template {template.source}")


# -----------------------------------------------------------------------------
# Rendering, bounded in time: a template is code that comes with a downloaded tokenizer, and Jinja's sandbox
# bounds a range() (100,000), not a loop inside a loop. A real template renders a conversation in
# milliseconds (1,000 messages: ~10 ms); RENDER_SECONDS is what one render of one conversation may take.

RENDER_SECONDS = 10.0


class RenderTimeout(BaseException):
    """A template's render ran past its time (raised by the alarm, inside Jinja). A BaseException, like
    KeyboardInterrupt, so that no `except Exception` between here and the alarm turns it into another error."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise RenderTimeout in the code inside once `seconds` pass: a SIGALRM timer, which interrupts Python
    code (Jinja's loops) between bytecodes and costs two system calls. Only the main thread receives
    signals; elsewhere (and where there is no setitimer) the code runs unbounded."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class TemplateTimeout(UserError):
    """A template that ran past RENDER_SECONDS: trying it on another conversation would only wait again."""


@contextlib.contextmanager
def template_errors(template: str, what: str, hint: str):
    """Any failure of a render inside, a timeout included, as one UserError: `template` names the template
    ("the chat template x.jinja"), `what` says what was rendered, `hint` what to do."""
    try:
        with time_limit(RENDER_SECONDS):
            yield
    except RenderTimeout:
        raise TemplateTimeout(f"{template} did not finish rendering {what} within {RENDER_SECONDS:g} s (a loop "
                              f"that does not end, or one far too long for a chat template). HINT: {hint}") from None
    except Exception as exc:  # noqa: BLE001 - Jinja syntax, undefined names, raise_exception(): one line
        raise UserError(f"{template} fails to render {what} ({type(exc).__name__}: {first_line(exc)}). "
                        f"HINT: {hint}") from None


def model_template_hint(source: str) -> str:
    return (f"fix or replace the template saved with the model ({source}/chat_template.jinja, or chat_template "
            "in its tokenizer_config.json), e.g. with the one the model was trained with")


def chat_prompt_ids(tokenizer, messages: list[dict], source: str | None = None, template: str | None = None,
                    hint: str | None = None) -> list[int]:
    """A conversation rendered with the tokenizer's chat template, up to the start of the assistant's reply
    (add_generation_prompt): token for token a prefix of that conversation with the reply, as trained. A
    template that fails or runs too long is one UserError naming the template (by default: that of the model
    folder `source`) and giving `hint` (by default: fix the model's template)."""
    source = source or tokenizer.name_or_path
    with template_errors(template or f"the chat template of {source}", "the conversation",
                         hint or model_template_hint(source)):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


# -----------------------------------------------------------------------------
# Rendering to (ids, mask)

# Each reply is checked against the rendering of the history before it (prefix stability, above), so the
# work of one conversation grows with the square of its turns (bench/chat_render_turns.py: 1,000 messages
# ~15 s on a busy 2-core CPU). A longer conversation is refused rather than rendered for hours.
MAX_MESSAGES = 1000


@dataclass
class Rendered:
    ids: np.ndarray   # uint32
    mask: np.ndarray  # uint8: TRAIN | START bits
    text: str         # what was tokenized (the rendering; prompt + completion + eos)


@dataclass
class ChatCounts:
    examples: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    skipped: dict = field(default_factory=lambda: {"no_assistant_turn": 0, "nothing_to_train": 0})
    prompt_merged: int = 0  # prompt/completion records whose prompt's last tokens merge with the completion


class ChatRenderer:
    """Examples -> Rendered with one template and one tokenizer.

    `encode_many(texts)` must give the tokenizer's ids for each text without special tokens added (what
    prepare_data.py's engine gives); the tokenizer itself gives the template its variables (eos_token,
    bos_token, ...) and the special tokens that end a turn.
    """

    def __init__(self, tokenizer, template: ChatTemplate, encode_many: Callable[[list[str]], list],
                 train_on_everything: bool = False):
        from transformers.utils.chat_template_utils import render_jinja_template  # heavy: only for chat data

        self.render_jinja = render_jinja_template
        self.template, self.encode_many = template, encode_many
        self.train_on_everything = train_on_everything
        self.variables = dict(tokenizer.special_tokens_map)
        self.eos_text = tokenizer.eos_token
        ends = end_of_turn_ids(tokenizer)
        self.is_end = np.zeros(max(len(tokenizer), int(ends.max()) + 1), dtype=bool)  # id -> ends a turn
        self.is_end[ends] = True
        self.counts = ChatCounts()
        self.decode = tokenizer.decode
        self.first_pair: tuple[bool, str] | None = None  # (conversational, where) of the run's first pair

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_many(texts)]

    def render_texts(self, conversations: list[list[dict]], where: str, add_generation_prompt: bool) -> list[str]:
        if not conversations:
            return []
        rendered = []
        for messages in conversations:  # each render bounded in time on its own
            with template_errors(f"{where}: {describe(self.template)}", "this conversation",
                                 "fix the template or the record; --chat-template FILE gives another template"):
                (text,), _ = self.render_jinja([messages], chat_template=self.template.text,
                                               add_generation_prompt=add_generation_prompt, **self.variables)
            rendered.append(text)
        return rendered

    def check_template(self) -> None:
        """Render and check PROBE (with its system turn, else without) before any record is read."""
        where = "a test conversation (before any record is read)"
        try:
            self.render(Conversation(PROBE, [m["role"] == "assistant" for m in PROBE]), where)
        except TemplateTimeout:
            raise
        except UserError:
            probe = PROBE[1:]  # some templates refuse a system turn: that is the records' business
            self.render(Conversation(probe, [m["role"] == "assistant" for m in probe]), where)
        self.counts = ChatCounts()

    def render(self, example: Conversation | PromptCompletion | PreferencePair, where: str) -> Rendered | None:
        """The example's ids and mask; None (counted) when it has no assistant turn or nothing to train."""
        if isinstance(example, PreferencePair):
            return self.preference_pair(example, where)
        if isinstance(example, PromptCompletion):
            text, ids, targets = self.prompt_completion(example)
        elif not any(example.trained):
            self.counts.skipped["no_assistant_turn"] += 1
            return None
        elif len(example.messages) > MAX_MESSAGES:
            raise UserError(f"{where}: the conversation has {len(example.messages):,} messages, more than the "
                            f"{MAX_MESSAGES:,} one conversation may have (each reply is checked against the "
                            "rendering of all the turns before it, work that grows with the square of the turns). "
                            f"HINT: split it into conversations of at most {MAX_MESSAGES:,} messages")
        else:
            text, ids, targets = self.conversation(example, where)
        if self.train_on_everything:
            targets[:] = True
        if not targets.any():
            self.counts.skipped["nothing_to_train"] += 1
            return None
        mask = targets.astype(np.uint8)
        mask[0] |= START
        return Rendered(ids, mask, text)

    def prompt_completion(self, example: PromptCompletion) -> tuple[str, np.ndarray, np.ndarray]:
        """TRL's join: ids of prompt + completion + eos (eos not doubled), trained from where they stop
        being the prompt's own ids."""
        text = example.prompt + example.completion
        if not example.completion.endswith(self.eos_text):
            text += self.eos_text
        ids, prompt = self.encode([text, example.prompt])
        start = common_prefix(ids, prompt)
        if start < len(prompt):
            self.counts.prompt_merged += 1
        targets = np.zeros(len(ids), dtype=bool)
        targets[start:] = True
        return text, ids, targets

    def preference_pair(self, pair: PreferencePair, where: str) -> Rendered:
        """TRL's tokens of a pair: prompt, prompt + chosen and prompt + rejected tokenized whole (the end token
        after a string completion, the template's own after a conversational one); the prompt is where the
        three part, the completions the rest. Stored once each: prompt, chosen, rejected (finetune/data/pairs.py)."""
        self.hold_pair_style(pair, where)
        if pair.conversational:
            texts = [*self.render_texts([pair.prompt], where, add_generation_prompt=True),
                     *self.render_texts([pair.prompt + pair.chosen, pair.prompt + pair.rejected], where,
                                        add_generation_prompt=False)]
        else:
            texts = [pair.prompt] + [pair.prompt + c + ("" if c.endswith(self.eos_text) else self.eos_text)
                                     for c in (pair.chosen, pair.rejected)]
        prompt, with_chosen, with_rejected = self.encode(texts)
        start = min(common_prefix(prompt, with_chosen), common_prefix(prompt, with_rejected))
        chosen, rejected = with_chosen[start:], with_rejected[start:]
        if np.array_equal(chosen, rejected):
            raise UserError(f"{where}: 'chosen' and 'rejected' give the same tokens, so the pair prefers nothing. "
                            "HINT: fix or drop the pair; a preference pair needs two different completions")
        if len(chosen) == 0 or len(rejected) == 0:
            raise UserError(f"{where}: a completion gives no token of its own after the prompt. HINT: check that "
                            "'chosen' and 'rejected' each add text after the prompt")
        if start < len(prompt):
            self.counts.prompt_merged += 1
        mask = np.zeros(start + len(chosen) + len(rejected), dtype=np.uint8)
        mask[start:] = TRAIN
        mask[start + len(chosen):] |= REJECTED
        mask[0] |= START
        ids = np.concatenate([with_chosen[:start], chosen, rejected]).astype(np.uint32)
        return Rendered(ids, mask, texts[1] + texts[2][len(texts[0]):])

    def hold_pair_style(self, pair: PreferencePair, where: str) -> None:
        """One run reads pairs of one style: standard (strings) or conversational (messages)."""
        if self.first_pair is None:
            self.first_pair = (pair.conversational, where)
        elif self.first_pair[0] != pair.conversational:
            style = {True: "conversational (messages)", False: "standard (strings)"}
            raise UserError(f"{where}: this pair is {style[pair.conversational]}, but {self.first_pair[1]} is "
                            f"{style[self.first_pair[0]]}; one run takes one format. HINT: prepare them separately, "
                            "or write every pair in one format")

    def conversation(self, example: Conversation, where: str) -> tuple[str, np.ndarray, np.ndarray]:
        """Each trained turn runs from the end of its generation prompt to the end of the conversation up
        to and including it, both found as token prefixes of the whole conversation (one batch of renders
        and one batch of encodes per conversation)."""
        messages, last = example.messages, len(example.messages) - 1
        turns = [turn for turn, trained in enumerate(example.trained) if trained]
        prompts = self.render_texts([messages[:turn] for turn in turns], where, add_generation_prompt=True)
        closed = [messages[:turn + 1] for turn in turns if turn != last]  # the whole conversation comes last
        texts = self.render_texts([*closed, messages], where, add_generation_prompt=False)
        encoded = self.encode([*prompts, *texts])
        ids, prompt_ids, closed_ids = encoded[-1], encoded[:len(turns)], iter(encoded[len(turns):-1])
        targets = np.zeros(len(ids), dtype=bool)
        for turn, prompt in zip(turns, prompt_ids):
            start = self.prefix_length(ids, prompt, True, where, turn)
            end = len(ids) if turn == last else self.prefix_length(ids, next(closed_ids), False, where, turn)
            targets[start:self.reply_end(ids, start, end)] = True
        return texts[-1], ids, targets

    def prefix_length(self, ids: np.ndarray, part: np.ndarray, generation_prompt: bool, where: str,
                      turn: int) -> int:
        """len(part), after checking that `part` (a rendering of the first turns) is a prefix of `ids`."""
        same = common_prefix(ids, part)
        if same == len(part):
            return same
        what = ("the generation prompt before it" if generation_prompt else
                "the conversation up to and including it")
        got, want = self.decode(part[same:same + 8].tolist()), self.decode(ids[same:same + 8].tolist())
        raise UserError(f"{where}: {describe(self.template)} is not prefix-stable at messages[{turn}] (an assistant "
                        f"turn): {what} tokenizes to {len(part)} ids that are not a prefix of the whole "
                        f"conversation's; they part at token {same} ({got!r} against {want!r}), so the model "
                        "would see other tokens at inference than in training. HINT: use a template whose "
                        "generation prompt ends on a token boundary (a newline or a special token) and that "
                        "renders earlier turns the same once later ones follow; or check that the reply does "
                        "not start with whitespace")

    def reply_end(self, ids: np.ndarray, start: int, end: int) -> int:
        """Where the trained part of a turn rendered as ids[start:end] ends: just after its last end-of-turn
        token (what follows, such as ChatML's newline after <|im_end|>, is template text); the whole turn
        when it holds none."""
        ends = np.flatnonzero(self.is_end[ids[start:end]])
        return start + int(ends[-1]) + 1 if len(ends) else end


def end_of_turn_ids(tokenizer) -> np.ndarray:
    """eos and every special added token (<|im_end|>, <|eot_id|>, <end_of_turn>, ...)."""
    ids = {tokenizer.eos_token_id}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids |= {i for i, token in decoder.items() if getattr(token, "special", False)}
    return np.asarray(sorted(i for i in ids if i is not None), dtype=np.uint32)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def parse_cell(value, where: str, name: str):
    """A CSV cell holding a list as JSON text (CSV has no lists): the list; other text as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: column {name!r} is not valid JSON ({exc.msg} at column {exc.colno}). "
                            "HINT: a CSV cell holding messages must be one JSON list") from None
    return value
