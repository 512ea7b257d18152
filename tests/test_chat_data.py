"""finetune/formats/chat.py: chat records -> (ids, mask) with the tiny tokenizer. What is trained is checked by
decoding the trained tokens: exactly the assistant replies plus their end tokens, nothing of a user or
system turn; the ids are apply_chat_template's, and the default template's mask is transformers'
return_assistant_tokens_mask (what TRL's assistant_only_loss trains on)."""
from __future__ import annotations

import numpy as np
import pytest

from finetune.core.errors import UserError
from finetune.formats import chat
from finetune.formats.chat import (
    DEFAULT_CHAT_TEMPLATE,
    MAX_MESSAGES,
    START,
    TRAIN,
    ChatRenderer,
    ChatTemplate,
    Conversation,
    FormatChooser,
    PromptCompletion,
    chat_prompt_ids,
    choose_template,
    example_of,
    format_of,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Where is the river?"}, {"role": "assistant", "content": "Past the old house."}],
    [{"role": "system", "content": "You are a captain."}, {"role": "user", "content": "The wind?"},
     {"role": "assistant", "content": "A great storm, said the captain!"}, {"role": "user", "content": "And then"},
     {"role": "assistant", "content": "Quiet morning. 東京 🙂"}],
    [{"role": "user", "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "parts"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "One reply"}]},
     {"role": "user", "content": "thanks"}],  # ends on a user turn: nothing after it is trained
]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def renderer(tok, template: str = DEFAULT_CHAT_TEMPLATE, **kwargs) -> ChatRenderer:
    def encode_many(texts):
        return [tok(text, add_special_tokens=False)["input_ids"] for text in texts]

    return ChatRenderer(tok, ChatTemplate(template, "default" if template == DEFAULT_CHAT_TEMPLATE else "test"),
                        encode_many, **kwargs)


def trained_text(tok, rendered) -> str:
    return tok.decode(rendered.ids[(rendered.mask & TRAIN) == TRAIN].tolist())


def replies(messages, end: str) -> str:
    texts = [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
             for m in messages if m["role"] == "assistant"]
    return "".join(text + end for text in texts)


def test_default_template_trains_the_replies_and_their_eos_only(tok):
    chat = renderer(tok)
    chat.check_template()
    assert choose_template(tok, None).source == "default"  # the tiny tokenizer has no template of its own
    for number, messages in enumerate(CONVERSATIONS):
        example = example_of({"messages": messages}, "messages", f"line {number + 1}")
        rendered = chat.render(example, f"line {number + 1}")
        assert trained_text(tok, rendered) == replies(messages, "<|endoftext|>")
        # the rest is the template's text and the user's/system's words, none of it trained
        untrained = tok.decode(rendered.ids[(rendered.mask & TRAIN) == 0].tolist())
        for m in example.messages:
            if m["role"] != "assistant":
                assert m["content"] in untrained
        assert rendered.mask[0] & START and not (rendered.mask[1:] & START).any()
        # token for token what transformers renders; the mask is its return_assistant_tokens_mask
        hf = tok.apply_chat_template(example.messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
        assert rendered.ids.tolist() == list(hf["input_ids"])
        assert (rendered.mask & TRAIN).tolist() == list(hf["assistant_masks"])
    # list content renders exactly like the joined string, in the template itself too (pipeline input)
    as_list = tok.apply_chat_template(CONVERSATIONS[2], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)
    assert as_list.startswith("User:\nTwo parts<|endoftext|>Assistant:\nOne reply<|endoftext|>")


def test_a_template_with_its_own_end_token_trains_it_but_not_the_newline_after(tok):
    chatml_tok = tok.__class__.from_pretrained(tok.name_or_path)
    chatml_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat = renderer(chatml_tok, CHATML)
    chat.check_template()
    rendered = chat.render(example_of({"messages": CONVERSATIONS[1]}, "messages", "line 2"), "line 2")
    assert trained_text(chatml_tok, rendered) == replies(CONVERSATIONS[1], "<|im_end|>")


def test_train_on_everything_sets_every_target_bit(tok):
    rendered = renderer(tok, train_on_everything=True).render(
        example_of({"messages": CONVERSATIONS[1]}, "messages", "line 1"), "line 1")
    assert (rendered.mask & TRAIN).all() and rendered.mask[0] == TRAIN | START


def test_prompt_completion_is_joined_the_trl_way(tok):
    chat = renderer(tok)
    for prompt, completion in (("The captain said:", " the storm is quiet."), ("Question: the sea?\n", "Blue")):
        rendered = chat.render(example_of({"prompt": prompt, "completion": completion}, "prompt_completion", "l"),
                               "l")
        # TRL: tokens of prompt + completion + eos, no text added; trained: what follows the prompt's tokens
        assert rendered.ids.tolist() == tok(prompt + completion + "<|endoftext|>", add_special_tokens=False)["input_ids"]
        assert trained_text(tok, rendered) == completion + "<|endoftext|>"
        assert tok.decode(rendered.ids[rendered.mask & TRAIN == 0].tolist()) == prompt
    assert chat.counts.prompt_merged == 0
    # A prompt whose last token merges with the completion's first: trained from where the ids part (TRL)
    merged = chat.render(PromptCompletion("the sh", "ip sailed"), "l")
    assert chat.counts.prompt_merged == 1
    assert trained_text(tok, merged).endswith("ip sailed<|endoftext|>")
    assert tok.decode(merged.ids.tolist()) == "the ship sailed<|endoftext|>"


def test_instruction_records_are_a_user_and_an_assistant_turn(tok):
    chat = renderer(tok)
    with_input = {"instruction": "Name the ship.", "input": "An old whale ship.", "output": "The Pequod."}
    without = {"instruction": "Say hello.", "input": "", "output": "Hello!"}
    for record in (with_input, without):
        assert format_of(record) == "instruction"
        rendered = chat.render(example_of(record, "instruction", "row 2"), "row 2")
        assert trained_text(tok, rendered) == record["output"] + "<|endoftext|>"
        user = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
        assert tok.decode(rendered.ids.tolist()) == f"User:\n{user}<|endoftext|>Assistant:\n{record['output']}<|endoftext|>"


def test_conversations_without_an_assistant_turn_are_counted(tok):
    chat = renderer(tok)
    assert chat.render(example_of({"messages": [{"role": "user", "content": "hi"}]}, "messages", "l"), "l") is None
    assert chat.render(example_of({"messages": []}, "messages", "l"), "l") is None
    assert chat.counts.skipped == {"no_assistant_turn": 2, "nothing_to_train": 0}


def test_conversational_prompt_completion_trains_the_completion_turns(tok):
    record = {"prompt": CONVERSATIONS[1][:4], "completion": CONVERSATIONS[1][4:]}
    rendered = renderer(tok).render(example_of(record, "prompt_completion", "l"), "l")
    assert trained_text(tok, rendered) == "Quiet morning. 東京 🙂<|endoftext|>"  # not the prompt's assistant turn


BAD_RECORDS = [
    ({"messages": "hello"}, "'messages' is a string, not a list of messages"),
    ({"messages": ["hello"]}, "messages[0] is a string, not a message object"),
    ({"messages": [{"content": "hi"}]}, "messages[0] has no 'role'"),
    ({"messages": [{"role": "user"}]}, "messages[0] has no 'content'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     "messages[1] has the role 'robot'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]},
     "messages[0] content[0] is a part of type 'image', not text"),
    ({"messages": [{"role": "user", "content": 7}]}, "content that is a number, not text"),
    ({"messages": [{"role": "user", "content": "bad \ud800"}]}, "lone surrogate (U+D800)"),
    ({"prompt": "p", "completion": None}, "field 'completion' is null, not text"),
    ({"instruction": ["x"], "output": "y"}, "field 'instruction' is a list, not text"),
]


@pytest.mark.parametrize("record,fragment", BAD_RECORDS)
def test_bad_records_name_the_place_and_give_a_hint(record, fragment):
    with pytest.raises(UserError) as raised:
        example_of(record, format_of(record), "chats.jsonl line 3")
    message = str(raised.value)
    assert message.startswith("chats.jsonl line 3") and fragment in message and "HINT:" in message


def test_one_format_per_run_unless_told():
    chooser = FormatChooser()
    assert chooser.choose({"messages": []}, "a.jsonl line 1") == "messages"
    with pytest.raises(UserError, match=r"a.jsonl line 2: this record is prompt/completion, but a.jsonl line 1 "
                                        r"is a conversation .*HINT: pass --chat-format messages"):
        chooser.choose({"prompt": "p", "completion": "c"}, "a.jsonl line 2")
    told = FormatChooser("messages")
    assert [told.choose(r, "l") for r in ({"messages": []}, {"prompt": "", "completion": ""},
                                          {"instruction": "", "output": ""})] == \
        ["messages", "prompt_completion", "instruction"]
    with pytest.raises(UserError, match="none of the fields of a chat record"):
        told.choose({"text": "plain"}, "l")
    with pytest.raises(UserError, match="--chat-format instruction needs the fields 'instruction' and 'output'"):
        FormatChooser("instruction").choose({"messages": []}, "l")
    plain = FormatChooser()
    assert plain.choose({"text": "a book"}, "b.jsonl line 1") is None
    with pytest.raises(UserError, match="b.jsonl line 1 is not a chat record"):
        plain.choose({"messages": []}, "b.jsonl line 2")
    # --chat-format messages reads prompt/completion as turns, through the template
    assert example_of({"prompt": "p", "completion": "c"}, "prompt_completion", "l", as_messages=True) == \
        Conversation([{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}], [False, True])


def test_bad_templates_are_one_error(tok, tmp_path):
    with pytest.raises(UserError, match=r"--chat-template .*nope.jinja does not exist\. HINT"):
        choose_template(tok, str(tmp_path / "nope.jinja"))
    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(UserError, match="is empty"):
        choose_template(tok, str(tmp_path / "empty.jinja"))
    path = tmp_path / "mine.jinja"
    path.write_text(CHATML)
    assert choose_template(tok, str(path)) == ChatTemplate(CHATML, str(path))
    failing = "{{ raise_exception('no system turns here') }}"
    with pytest.raises(UserError, match=r"fails to render this conversation \(TemplateError: no system turns here\)"):
        renderer(tok, failing).check_template()
    broken = "{% for message in messages %}"
    with pytest.raises(UserError, match="fails to render"):
        renderer(tok, broken).check_template()
    # a generation prompt that is not how the template writes an assistant turn
    other_header = DEFAULT_CHAT_TEMPLATE.replace("{{- 'Assistant:\\n' -}}\n{%- generation", "{{- 'Bot:\\n' -}}\n{%- generation")
    assert other_header != DEFAULT_CHAT_TEMPLATE
    with pytest.raises(UserError, match=r"a test conversation \(before any record is read\): the chat "
                                        r"template test is not prefix-stable at messages\[\d\].*HINT"):
        renderer(tok, other_header).check_template()
    # "Assistant: " + reply: the generation prompt's trailing space is its own token, the reply's " the" another
    unstable = DEFAULT_CHAT_TEMPLATE.replace("'Assistant:\\n'", "'Assistant: '")
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "the sea"}]
    with pytest.raises(UserError, match=r"chats.jsonl line 9: .*not prefix-stable at messages\[1\]"):
        renderer(tok, unstable).render(Conversation(messages, [False, True]), "chats.jsonl line 9")
    assert np.array_equal(renderer(tok).render(Conversation(messages, [False, True]), "l").ids,
                          tok.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=True,
                                                  return_dict=False))


# Two nested loops of Jinja's sandbox's largest range(): 10^10 iterations, hours (issue 27, 6).
HANGING = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
           + DEFAULT_CHAT_TEMPLATE)


def test_a_template_that_does_not_end_is_stopped_and_named(tok, monkeypatch):
    """Stopped at the time limit (0.5 s here; chat.RENDER_SECONDS in use), once: the probe without its system
    turn is not tried after a timeout, since the template would only run out of time again."""
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    calls = []
    slow = renderer(tok, HANGING)
    real = slow.render_jinja
    slow.render_jinja = lambda *a, **k: calls.append(1) or real(*a, **k)
    with pytest.raises(UserError) as error:
        slow.check_template()
    assert str(error.value).startswith("a test conversation (before any record is read): the chat template test did "
                                       "not finish rendering this conversation within 0.5 s") and "HINT:" in str(error.value)
    assert len(calls) == 1
    # the timer is gone: nothing fires later
    import signal
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    tok.chat_template = HANGING  # generate.py --chat and the training samples: the model's own template
    try:
        with pytest.raises(UserError, match=r"the chat template of MODEL did not finish rendering the conversation "
                                            r"within 0\.5 s .*HINT: fix or replace the template saved with the model"):
            chat_prompt_ids(tok, [{"role": "user", "content": "hi"}], "MODEL")
        tok.chat_template = "{{ raise_exception('needs a system turn') }}"
        with pytest.raises(UserError, match=r"the chat template of MODEL fails to render the conversation "
                                            r"\(TemplateError: needs a system turn\)\. HINT"):
            chat_prompt_ids(tok, [{"role": "user", "content": "hi"}], "MODEL")
    finally:
        tok.chat_template = None


def test_a_conversation_beyond_the_message_limit_is_refused_before_rendering(tok):
    """Rendering checks each reply against all the turns before it, work that grows with the square of the turns;
    past MAX_MESSAGES a conversation is one error line, not hours (issue 27, 7)."""
    def exchanges(n):
        messages = [m for _ in range(n) for m in ({"role": "user", "content": "the sea?"},
                                                  {"role": "assistant", "content": "calm."})]
        return Conversation(messages, [m["role"] == "assistant" for m in messages])

    refusing = renderer(tok)
    refusing.render_jinja = None  # refused before any render
    with pytest.raises(UserError, match=rf"long.jsonl line 4: the conversation has 1,002 messages, more than the "
                                        rf"{MAX_MESSAGES:,} one conversation may have .*HINT: split it into "
                                        rf"conversations of at most {MAX_MESSAGES:,} messages"):
        refusing.render(exchanges(MAX_MESSAGES // 2 + 1), "long.jsonl line 4")
    few = renderer(tok).render(exchanges(3), "l")
    assert trained_text(tok, few) == "calm.<|endoftext|>" * 3
