"""Ollama's Modelfile for an exported GGUF: `ollama create NAME -f Modelfile`.

Ollama's TEMPLATE is a Go template, not the Jinja chat template the tokenizer has, so it cannot be copied.
It is derived instead: the Jinja template is rendered for conversations whose contents are marker
strings, the text around each marker is the role's prefix and suffix, and that per-message format is
checked to reproduce the Jinja rendering exactly on further conversations. Only then is it written as a
Go template; a chat template that is more than a per-message format (one that rewrites contents, or
treats the first or last turn specially) gets no TEMPLATE and a warning, and the GGUF's embedded
template is what llama.cpp uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HEADER = "# Written by export.py"
ROLES = ("system", "user", "assistant")


@dataclass
class ChatFormat:
    preamble: str  # once, before the first message (a BOS text, say)
    prefix: dict[str, str]  # role -> text before its content
    suffix: dict[str, str]  # role -> text after its content
    generation: str  # after the last message, when asking the model for its answer


def render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def render_format(fmt: ChatFormat, messages: list[dict], generation: bool) -> str:
    text = fmt.preamble + "".join(fmt.prefix[m["role"]] + m["content"] + fmt.suffix[m["role"]] for m in messages)
    return text + (fmt.generation if generation else "")


def pieces(text: str, markers: list[str]) -> list[str] | None:
    """`text` split at the markers, in order: len(markers) + 1 pieces, or None when one is missing."""
    out = []
    for marker in markers:
        before, found, text = text.partition(marker)
        if not found:
            return None
        out.append(before)
    return out + [text]


def msg(role: str, n: int) -> dict:
    return {"role": role, "content": f"MARKER{role.upper()}{n}END"}


def derive_format(tokenizer) -> ChatFormat | None:
    """The per-message format of the tokenizer's chat template (see the module docstring), or None."""
    try:
        u1, a1, u2, a2 = msg("user", 1), msg("assistant", 1), msg("user", 2), msg("assistant", 2)
        turns = pieces(render(tokenizer, [u1, a1, u2, a2], False), [m["content"] for m in (u1, a1, u2, a2)])
        lone = pieces(render(tokenizer, [u1], False), [u1["content"]])
        asking = pieces(render(tokenizer, [u1], True), [u1["content"]])
    except Exception:  # noqa: BLE001 - a template that raises on these conversations has no simple format
        return None
    if turns is None or lone is None or asking is None:
        return None
    # turns: [preamble+prefix_u, suffix_u+prefix_a, suffix_a+prefix_u, suffix_u+prefix_a, suffix_a]
    suffix_a, suffix_u = turns[4], lone[1]
    if not turns[2].startswith(suffix_a) or not turns[1].startswith(suffix_u) or not asking[1].startswith(suffix_u):
        return None
    prefix_u, prefix_a = turns[2][len(suffix_a):], turns[1][len(suffix_u):]
    if not turns[0].endswith(prefix_u):
        return None
    fmt = ChatFormat(preamble=turns[0][:len(turns[0]) - len(prefix_u)], prefix={"user": prefix_u, "assistant": prefix_a},
                     suffix={"user": suffix_u, "assistant": suffix_a}, generation=asking[1][len(suffix_u):])
    add_system_role(tokenizer, fmt)
    return fmt if reproduces(tokenizer, fmt) else None


def add_system_role(tokenizer, fmt: ChatFormat) -> None:
    """The system message's prefix and suffix, when the template takes one."""
    s, u = msg("system", 1), msg("user", 1)
    try:
        found = pieces(render(tokenizer, [s, u], False), [s["content"], u["content"]])
    except Exception:  # noqa: BLE001 - a template without a system role
        return
    if found and found[0].startswith(fmt.preamble) and found[1].endswith(fmt.prefix["user"]):
        fmt.prefix["system"] = found[0][len(fmt.preamble):]
        fmt.suffix["system"] = found[1][:len(found[1]) - len(fmt.prefix["user"])]


def reproduces(tokenizer, fmt: ChatFormat) -> bool:
    """Does the format give the Jinja template's text, exactly, on conversations it was not derived from?"""
    u, a = [msg("user", i) for i in range(3)], [msg("assistant", i) for i in range(3)]
    conversations = [[u[0]], [u[0], a[0]], [u[0], a[0], u[1]], [u[0], a[0], u[1], a[1], u[2]]]
    if "system" in fmt.prefix:
        conversations += [[msg("system", 0), u[0]], [msg("system", 0), u[0], a[0], u[1]]]
    for messages in conversations:
        for generation in (False, True):
            if render(tokenizer, messages, generation) != render_format(fmt, messages, generation):
                return False
    return True


def go_literal(text: str) -> str:
    """Text as it stands in a Go template: `{{` would open an action, so it is written as one."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(fmt: ChatFormat) -> str:
    """Ollama's TEMPLATE: the preamble, each message in its role's format, then the generation prompt."""
    branches = []
    for i, role in enumerate(r for r in ROLES if r in fmt.prefix):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{go_literal(fmt.prefix[role])}{{{{ .Content }}}}'
                        f'{go_literal(fmt.suffix[role])}')
    return (go_literal(fmt.preamble) + "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}"
            + go_literal(fmt.generation))


def stop_words(fmt: ChatFormat) -> list[str]:
    """Where the answer ends: the assistant's suffix, and the next user turn's prefix (its first line)."""
    words = []
    for text in (fmt.suffix["assistant"], fmt.prefix["user"]):
        word = text.strip().splitlines()[0] if text.strip() else ""
        if word and word not in words:
            words.append(word)
    return words


@dataclass
class ModelfilePlan:
    text: str
    warning: str | None  # a chat template that could not be written as a TEMPLATE


def printable(text: str) -> str:
    """`text` with its control characters escaped (a newline as \\n): a folder name with a newline in it must
    not start a line of its own in the Modelfile, where it would be read as an instruction."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def parameter_value(text: str) -> bool:
    """Can `text` stand in a PARAMETER line as a quoted value (no quote, no control character)?"""
    return bool(text) and '"' not in text and text.isprintable()


def modelfile(gguf_path: Path, modelfile_path: Path, source: str, tokenizer, chat_template: str | None,
              context_length: int | None = None) -> ModelfilePlan:
    """The Modelfile for `gguf_path`: FROM it; the model's context length as num_ctx (Ollama's default is
    another, longer than GPT-2's 1024 positions); a chat model's TEMPLATE and stop words, or a plain-text
    model's end-of-text token as its stop word."""
    lines = [printable(f"{HEADER} from {source}; create the Ollama model with: ollama create NAME -f {modelfile_path}"),
             f"FROM ./{gguf_path.name}"]
    if context_length:
        lines.append(f"PARAMETER num_ctx {int(context_length)}")
    warning = None
    if chat_template is not None:
        fmt = derive_format(tokenizer)
        template = go_template(fmt) if fmt is not None else None
        if template is None or '"""' in template:
            warning = ("warning: the chat template is not a plain per-message format, so the Modelfile has no "
                       "TEMPLATE; the GGUF holds the template itself (tokenizer.chat_template), which llama.cpp "
                       "uses. HINT: add a TEMPLATE to the Modelfile by hand for Ollama")
        else:
            lines.append(f'TEMPLATE """{template}"""')
            lines += [f'PARAMETER stop "{word}"' for word in stop_words(fmt) if parameter_value(word)]
    elif parameter_value(tokenizer.eos_token or ""):  # plain text: the text ends where the model writes its EOS
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return ModelfilePlan("\n".join(lines) + "\n", warning)


def written_by_export(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(HEADER)
    except (OSError, UnicodeDecodeError):
        return False
