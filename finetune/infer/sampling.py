"""Sampling text from a model: shared by generate.py and the training-time samples."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from finetune.formats.chat import chat_prompt_ids
from finetune.models.loading import model_context_length, unwrap_model


@dataclass
class Sample:
    text: str           # prompt + completion, as printed
    completion: str     # the generated part only
    new_tokens: int     # tokens generated, the end-of-text token included
    finish_reason: str  # "eos" (the model ended the text) or "length" (hit --max-new-tokens)


def generation_kwargs(model, tokenizer, *, max_new_tokens: int, greedy: bool = False, temperature: float = 0.8,
                      top_k: int | None = None, top_p: float | None = None,
                      repetition_penalty: float | None = None) -> dict:
    """Arguments for model.generate(), all explicit so the model's generation_config.json cannot
    slip in its own defaults (transformers applies top_k=50 when top_k is left unset)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    # GPT-2 has no pad token; generate() pads finished rows with it, and eos is the usual stand-in.
    # Setting it (with an attention mask from the tokenizer) also keeps generate() from warning.
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    if pad is None:
        pad = 0  # no eos either: nothing ends early, so no row is ever padded
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                  repetition_penalty=repetition_penalty or 1.0, use_cache=True)
    if greedy:
        # the sampling flags are left out: transformers warns when they are set without sampling
        return dict(kwargs, do_sample=False)
    return dict(kwargs, do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)


def generate_samples(model, tokenizer, prompt: str | list[int], gen_kwargs: dict, *, num_samples: int, seed: int,
                     device, ctx=None, streamer=None) -> list[Sample]:
    """num_samples continuations of one prompt (text, or token ids: a rendered chat), the RNG seeded with
    `seed` first."""
    import torch

    if isinstance(prompt, str):
        enc = tokenizer(prompt, return_tensors="pt").to(device)  # input_ids and attention_mask
    else:
        input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
        enc = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    seed_generators(seed, torch.device(device))
    with ctx or contextlib.nullcontext():
        out = model.generate(**enc, **gen_kwargs, num_return_sequences=num_samples, streamer=streamer)
    eos = gen_kwargs["eos_token_id"]
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    prompt_ids = enc["input_ids"][0].tolist()
    return [decode_sample(tokenizer, prompt_ids, row[len(prompt_ids):].tolist(), eos_ids) for row in out]


def decode_sample(tokenizer, prompt_ids: list[int], new_ids: list[int], eos_ids: set) -> Sample:
    # rows that ended early are padded up to the longest one; the text stops at the first eos
    end = next((i for i, t in enumerate(new_ids) if t in eos_ids), None)
    kept = new_ids if end is None else new_ids[:end]
    # decode prompt and continuation together: a character can span the boundary between them
    text = tokenizer.decode(prompt_ids + kept, skip_special_tokens=True)
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    completion = text[len(prompt_text):] if text.startswith(prompt_text) else tokenizer.decode(
        kept, skip_special_tokens=True)
    return Sample(text=text, completion=completion, new_tokens=len(kept) + (end is not None),
                  finish_reason="eos" if end is not None else "length")


def seed_generators(seed: int, device) -> None:
    """Seed the CPU generator and the one of `device` only (torch.manual_seed touches every GPU)."""
    import torch

    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def sample_during_training(model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int, device,
                           temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                           ctx=None, chat: bool = False, should_stop=None) -> list[str]:
    """One sample (prompt + continuation) per prompt, for the training log; with `chat`, each prompt is a
    user turn rendered with the tokenizer's chat template and the sample is the reply. Training is not disturbed:
    the RNG states it uses and every module's train/eval mode are put back as they were.

    `model` may be wrapped by DistributedDataParallel (.module) or torch.compile (._orig_mod); the
    plain model underneath is used, so a compiled graph is not recompiled for generation shapes.
    `ctx` is the training autocast context, if any. No collective ops: calling it on one rank is fine.
    A sample is cut short where it would run past the model's context, rather than crash training.
    `should_stop()` (a stop request) is asked before each prompt: the samples done so far are returned.
    """
    import torch

    if not temperature > 0:
        raise ValueError(f"temperature must be above 0, got {temperature}")
    model = unwrap_model(model)
    device = torch.device(device)
    gen_kwargs = generation_kwargs(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p)
    n_ctx = model_context_length(model.config)
    modes = [(m, m.training) for m in model.modules()]
    samples = []
    # no_grad, not inference_mode: buffers a model creates lazily inside inference_mode (rotary
    # caches, for one) would be unusable by the backward pass of the next training step
    with preserved_rng(device), torch.no_grad():
        try:
            model.eval()  # dropout off, as in real use
            for text in prompts:
                if should_stop is not None and should_stop():
                    break
                prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}]) if chat else text
                n_prompt = len(prompt) if chat else len(tokenizer(prompt)["input_ids"])
                room = n_ctx - n_prompt if n_ctx else max_new_tokens
                if room < 1:
                    samples.append(f"{text} [no sample: the prompt fills the model's {n_ctx}-token context]")
                    continue
                kwargs = dict(gen_kwargs, max_new_tokens=min(max_new_tokens, room))
                (sample,) = generate_samples(model, tokenizer, prompt, kwargs, num_samples=1, seed=seed,
                                             device=device, ctx=ctx)
                samples.append(sample.completion if chat else sample.text)
        finally:
            for module, was_training in modes:
                module.training = was_training
    return samples


@contextlib.contextmanager
def preserved_rng(device):
    """Put back the CPU RNG and the RNG of `device` (the ones seed_generators touches)."""
    import torch

    cpu_state = torch.get_rng_state()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device_state = torch.cuda.get_rng_state(index)
    elif device.type == "mps":
        device_state = torch.mps.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if device.type == "cuda":
            torch.cuda.set_rng_state(device_state, index)
        elif device.type == "mps":
            torch.mps.set_rng_state(device_state)
