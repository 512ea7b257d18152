"""export.py --to gguf: the file read back with gguf.GGUFReader gives the same model (logits), the metadata
llama.cpp reads is right field by field, and bad input is one line with nothing written.

The round trip rebuilds the Hugging Face state dict from the GGUF tensors by undoing the layouts llama.cpp
wants (GPT-2's Conv1D stored transposed, Llama's q/k rows interleaved per head), then compares logits of
the rebuilt model with the original's. The layouts are checked against llama.cpp itself by
bench/gguf_llamacpp.py (not part of the suite: it builds llama.cpp).
"""
from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO_ROOT, build_tiny_model

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
import export  # noqa: E402 - the script, run in-process (each subprocess costs ~4 s of imports)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def run_export(*args) -> int:
    try:
        return export.main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


def read_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.gguf", "Modelfile"))
    return dst


# -----------------------------------------------------------------------------
# Tiny models of each architecture, saved with save_pretrained next to the tiny tokenizer


def save_tiny(folder: Path, tokenizer_dir: Path, config) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.mkdir()
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a mix-up shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "ln" in name else 0.0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir) -> dict[str, Path]:
    """gpt2 (n_inner None, tied), gpt2 with n_inner set and an untied output, llama (GQA), qwen2 (biases)."""
    from transformers import AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

    root = tmp_path_factory.mktemp("export_models")
    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    return {
        "gpt2": save_tiny(root / "gpt2", tiny_tokenizer_dir, GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32,
                                                                         n_layer=2, n_head=2)),
        "gpt2-untied": save_tiny(root / "gpt2-untied", tiny_tokenizer_dir,
                                 GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=48,
                                            tie_word_embeddings=False, layer_norm_epsilon=1e-6)),
        "llama": save_tiny(root / "llama", tiny_tokenizer_dir, LlamaConfig(**small, tie_word_embeddings=False)),
        "qwen2": save_tiny(root / "qwen2", tiny_tokenizer_dir, Qwen2Config(**small, tie_word_embeddings=True)),
    }


# -----------------------------------------------------------------------------
# The round trip


def layout_back(hf_name: str, array, config):
    """Undo what the export did to the layout of `hf_name` (the inverse of llama.cpp's layout)."""
    t = torch.from_numpy(array.copy())
    if config.model_type == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return t.t().contiguous()
    if config.model_type == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
        rows = t.shape[0]  # rows (2j, 2j+1) of each head back to (j, j + half)
        return t.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(t.shape).contiguous()
    return t


def load_original(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def rebuild_from_gguf(path: Path, original, rebuilt=None):
    """A Hugging Face model whose weights are the GGUF file's tensors (dequantized), for `original`'s config
    (`rebuilt`: a model of that config to load them into, instead of a new one)."""
    from transformers import AutoModelForCausalLM

    config = original.config
    arch = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
    name_map = gguf.get_tensor_name_map(arch[config.model_type], config.num_hidden_layers)
    hf_names = {name_map.get_name(k, try_suffixes=(".weight", ".bias")): k for k in original.state_dict()}
    state = {}
    for tensor in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype("float32")
        state[hf_names[tensor.name]] = layout_back(hf_names[tensor.name], values, config)
    if "lm_head.weight" not in state:  # tied: written once, as the token embedding
        state["lm_head.weight"] = state[hf_names["token_embd.weight"]]
    rebuilt = rebuilt if rebuilt is not None else AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return rebuilt


def max_logit_diff(a, b, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


# the bounds: f32 is exact up to float rounding; f16/bf16/q8_0 as measured on these tiny models, with margin
BOUNDS = {"f32": 1e-6, "f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2, "q4_0": 0.3}


@pytest.mark.parametrize("kinds,outtypes", [(("gpt2",), ("f32", "f16", "bf16", "q8_0", "q4_0")),
                                            (("gpt2-untied",), ("f32",)), (("llama",), ("f32", "q8_0", "q4_0")),
                                            (("qwen2",), ("f32", "f16"))],
                         ids=["gpt2", "gpt2-untied", "llama", "qwen2"])
def test_round_trip_logits(tiny_models, tmp_path, kinds, outtypes):
    """Each outtype written, read back and rebuilt: the logits equal the original's within BOUNDS."""
    (kind,) = kinds
    folder = copy_model(tiny_models[kind], tmp_path / kind)
    original, rebuilt = load_original(folder), None
    for outtype in outtypes:
        assert run_export("--model", folder, "--outtype", outtype) == 0
        path = folder / f"model-{outtype}.gguf"
        rebuilt = rebuild_from_gguf(path, original, rebuilt)
        diff = max_logit_diff(rebuilt, original, original.config.vocab_size)
        print(f"{kind} {outtype}: max |logit difference| {diff:.2e}")
        assert diff <= BOUNDS[outtype], (outtype, diff)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        matrix = "blk.0.attn_qkv.weight" if kind.startswith("gpt2") else "blk.0.attn_q.weight"
        assert types[matrix] == outtype.upper()
        assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay f32 whatever the outtype
        assert ("output.weight" in types) == (kind in ("gpt2-untied", "llama"))  # a tied output is written once


def q4_0_blocks_as_llama_cpp_reads_them(raw) -> np.ndarray:
    """The values of Q4_0 bytes, decoded from llama.cpp's block layout (ggml-common.h block_q4_0: an fp16 scale d,
    then 16 bytes whose low nibbles are values 0-15 and high nibbles values 16-31, each (nibble - 8) * d;
    ggml-quants.c dequantize_row_q4_0), written here from that description, not with gguf's own decoder."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    nibbles = np.concatenate([blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4], axis=1).astype(np.float32)
    return (nibbles - 8) * d


def test_q4_0_blocks_are_llama_cpps_layout_within_the_quantization_bound(tiny_models, tmp_path):
    """Each Q4_0 matrix decoded as llama.cpp decodes it equals gguf's own dequantization, and every weight is
    within its block's step |d| = max|block| / 8 of the original (rounding to the nearest of 16 levels is half a
    step off at most; the one value the top level clips, a full step), with the fp16 rounding of d on top."""
    folder = copy_model(tiny_models["llama"], tmp_path / "m")
    assert run_export("--model", folder, "--outtype", "q4_0") == 0
    model = load_original(folder)
    original = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    hf_names = {name_map.get_name(k, try_suffixes=(".weight", ".bias")): k for k in original}
    checked = 0
    for tensor in gguf.GGUFReader(folder / "model-q4_0.gguf").tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_0:
            continue
        ours = q4_0_blocks_as_llama_cpp_reads_them(tensor.data)
        assert np.array_equal(ours.reshape(-1), gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1))
        weights = layout_back(hf_names[tensor.name], ours.reshape(tensor.data.shape[0], -1), model.config).numpy()
        blocks = original[hf_names[tensor.name]].reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 8
        assert np.all(np.abs(weights.reshape(-1, 32) - blocks) <= step * (1 + 2**-8) + 1e-12), tensor.name
        checked += 1
    assert checked == 2 * 7 + 2  # q, k, v, o, gate, up, down in each block; token embedding and output


def test_gpt2_layout_and_metadata(tiny_models, tmp_path):
    """Every field llama.cpp reads, and the tensor shapes in ggml order (Conv1D weights transposed)."""
    from transformers import AutoTokenizer

    folder = copy_model(tiny_models["gpt2-untied"], tmp_path / "m")
    assert run_export("--model", folder) == 0
    fields = read_fields(folder / "model-f16.gguf")
    tok = AutoTokenizer.from_pretrained(folder)
    expected = {"general.architecture": "gpt2", "general.name": "m", "general.file_type": 1,
                "gpt2.context_length": 64, "gpt2.embedding_length": 32, "gpt2.feed_forward_length": 48,
                "gpt2.block_count": 2, "gpt2.attention.head_count": 2, "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": tok.bos_token_id,
                "tokenizer.ggml.eos_token_id": tok.eos_token_id, "tokenizer.ggml.padding_token_id": tok.eos_token_id,
                "tokenizer.ggml.add_bos_token": False}
    for key, value in expected.items():
        assert fields[key] == value, (key, fields[key], value)
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    vocab = tok.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    merges = tok.backend_tokenizer.to_str()
    assert len(fields["tokenizer.ggml.merges"]) == len(vocab) - 256 - 1  # byte alphabet, one special token
    assert fields["tokenizer.ggml.merges"][0] in merges.replace('","', " ")
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.NORMAL) == len(vocab) - 1
    assert "tokenizer.chat_template" not in fields
    shapes = {t.name: list(t.shape) for t in gguf.GGUFReader(folder / "model-f16.gguf").tensors}  # ggml: ne0 first
    assert shapes["blk.0.attn_qkv.weight"] == [32, 96]  # llama.cpp's {n_embd, 3 n_embd}
    assert shapes["blk.0.ffn_up.weight"] == [32, 48] and shapes["blk.0.ffn_down.weight"] == [48, 32]
    # plain text: no TEMPLATE; the context length and the end-of-text token as the stop word
    assert (folder / "model-f16.Modelfile").read_text().splitlines()[1:] == [
        "FROM ./model-f16.gguf", "PARAMETER num_ctx 64", 'PARAMETER stop "<|endoftext|>"']


def test_llama_metadata(tiny_models, tmp_path):
    folder = copy_model(tiny_models["llama"], tmp_path / "m")
    assert run_export("--model", folder, "--outtype", "f32") == 0
    fields = read_fields(folder / "model-f32.gguf")
    expected = {"general.architecture": "llama", "llama.context_length": 64, "llama.embedding_length": 32,
                "llama.feed_forward_length": 64, "llama.block_count": 2, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8, "llama.vocab_size": 400}
    for key, value in expected.items():
        assert fields[key] == value, (key, fields[key], value)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)


def test_chat_template_and_modelfile(tiny_model_dir, tmp_path):
    """A chat model: the template in the GGUF, its tokens marked as control tokens, and a Modelfile whose
    Go TEMPLATE and stop words are the ChatML format the Jinja template renders."""
    from transformers import AutoTokenizer

    folder = tmp_path / "chat"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    build_tiny_model(folder, vocab_size=len(tok))
    assert run_export("--model", folder) == 0
    fields = read_fields(folder / "model-f16.gguf")
    assert fields["tokenizer.chat_template"] == CHATML
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert fields["tokenizer.ggml.token_type"][start] == fields["tokenizer.ggml.token_type"][end] == gguf.TokenType.CONTROL
    lines = (folder / "model-f16.Modelfile").read_text().split("\n")
    assert lines[1:] == [
        "FROM ./model-f16.gguf",
        "PARAMETER num_ctx 128",
        'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system',
        '{{ .Content }}<|im_end|>',
        '{{ else if eq .Role "user" }}<|im_start|>user',
        '{{ .Content }}<|im_end|>',
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant',
        '{{ .Content }}<|im_end|>',
        '{{ end }}{{ end }}<|im_start|>assistant',
        '"""',
        'PARAMETER stop "<|im_end|>"',
        'PARAMETER stop "<|im_start|>user"',
        ""]


def test_lora_adapter_merged_on_the_way(tiny_models, tmp_path):
    """An adapter folder: exported as base + adapter merged, the logits of peft's merge_and_unload."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = copy_model(tiny_models["gpt2"], tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                  fan_in_fan_out=True, task_type="CAUSAL_LM"))
    peft_model.peft_config["default"].base_model_name_or_path = str(base.resolve())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    merged = peft_model.merge_and_unload().eval()
    assert run_export("--model", adapter, "--outtype", "f32") == 0
    original = load_original(base)
    rebuilt = rebuild_from_gguf(adapter / "model-f32.gguf", original)
    assert max_logit_diff(rebuilt, merged, 400) <= 1e-5
    assert max_logit_diff(rebuilt, original, 400) > 1e-3  # the adapter is in there

    shutil.rmtree(base)  # the base gone: one line naming it
    (adapter / "model-f32.gguf").unlink()
    assert run_export("--model", adapter) == 2
    assert not list(adapter.glob("*.gguf"))


# -----------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written; existing files kept


def assert_refused(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "HINT:" in lines[0], (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_inputs_refused_with_nothing_written(tiny_models, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(capsys, run_export("--model", empty), "has no config.json", "not a saved model")
    run_dir = tmp_path / "out"  # a training output holding only checkpoints: say which folder holds the model
    copy_model(tiny_models["gpt2"], run_dir / "checkpoint-4")
    copy_model(tiny_models["gpt2"], run_dir / "checkpoint-8")
    assert_refused(capsys, run_export("--model", run_dir), f"--model {run_dir / 'checkpoint-8'}")
    assert_refused(capsys, run_export("--model", tmp_path / "nowhere"), "does not exist")

    opt = tmp_path / "opt"  # an architecture llama.cpp runs but this export does not write
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(opt)
    AutoModelForCausalLM.from_config(OPTConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1,
                                               ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(opt)
    assert_refused(capsys, run_export("--model", opt), "'opt'", "gpt2, llama, qwen2")

    odd = copy_model(tiny_models["gpt2"], tmp_path / "odd-tokenizer")  # a pre-tokenizer llama.cpp lacks
    spec = json.loads((odd / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (odd / "tokenizer.json").write_text(json.dumps(spec))
    assert_refused(capsys, run_export("--model", odd), "cannot be named with certainty")

    model = copy_model(tiny_models["gpt2"], tmp_path / "m")
    assert_refused(capsys, run_export("--model", model, "--output", tmp_path / "m.bin"), "does not end in .gguf")
    assert_refused(capsys, run_export("--model", model, "--output", tmp_path / "no" / "m.gguf"), "does not exist")
    (model / "model-f16.Modelfile").write_text("FROM ./mine.gguf\nPARAMETER temperature 0.3\n")  # the user's own
    assert_refused(capsys, run_export("--model", model), "not written by export.py")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    assert_refused(capsys, run_export("--model", model), "pip install gguf")
    for folder in (empty, run_dir, opt, odd, model):
        assert not list(folder.rglob("*.gguf")) and not list(folder.rglob(".tmp-*")), folder
    assert (model / "model-f16.Modelfile").read_text() == "FROM ./mine.gguf\nPARAMETER temperature 0.3\n"


def test_existing_file_kept_without_overwrite(tiny_models, tmp_path, capsys):
    model = copy_model(tiny_models["gpt2"], tmp_path / "m")
    out = tmp_path / "book.gguf"
    assert run_export("--model", model, "--output", out, "--outtype", "q8_0") == 0
    before = out.read_bytes()
    assert run_export("--model", model, "--output", out) == 2  # f16 asked for, q8_0 kept
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert run_export("--model", model, "--output", out, "--overwrite") == 0
    assert read_fields(out)["general.file_type"] == 1 and out.read_bytes() != before
    assert (tmp_path / "book.Modelfile").read_text().splitlines()[1] == "FROM ./book.gguf"


def test_disk_full_is_exit_4_and_no_partial_file(tiny_models, tmp_path, capsys, monkeypatch):
    model = copy_model(tiny_models["gpt2"], tmp_path / "m")
    written = []
    real = gguf.GGUFWriter.write_tensor_data

    def fill_disk(self, tensor, *args, **kwargs):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(tensor.nbytes)
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fill_disk)
    assert run_export("--model", model) == 4
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert not list(model.glob("*.gguf")) and not list(model.glob(".tmp-*")) and not list(model.glob("*Modelfile"))


# -----------------------------------------------------------------------------
# Where exports go, and what is left when one is stopped (issue 27)


def test_exports_of_a_run_go_to_its_export_folder_one_modelfile_each(tiny_models, tmp_path, capsys):
    """The trainer replaces best/ and adapter/ whole and prunes checkpoint-N/: an export inside them was lost at
    the next --resume. Exports of a run's models go to RUN/export/, named after the model, each with its own
    Modelfile, so exporting another --outtype never repoints an earlier Modelfile."""
    run = tmp_path / "out"
    copy_model(tiny_models["gpt2"], run)
    (run / "train_config.json").write_text("{}")  # what marks a folder as a run of the training script
    for name in ("best", "checkpoint-4"):
        copy_model(tiny_models["gpt2"], run / name)
    expected = {run: "model", run / "best": "best", run / "checkpoint-4": "checkpoint-4",
                run / "adapter": "adapter", run / "best" / "adapter": "best-adapter"}
    for model, name in expected.items():
        assert export.default_output(model, "q8_0") == run.resolve() / "export" / f"{name}-q8_0.gguf"
    plain = copy_model(tiny_models["gpt2"], tmp_path / "plain")  # no run: next to its files, as before
    assert export.default_output(plain, "f16") == plain / "model-f16.gguf"

    assert run_export("--model", run / "best") == 0
    assert run_export("--model", run / "best", "--outtype", "q8_0") == 0
    export_dir = run / "export"
    assert sorted(p.name for p in export_dir.iterdir()) == ["best-f16.Modelfile", "best-f16.gguf",
                                                            "best-q8_0.Modelfile", "best-q8_0.gguf"]
    assert (export_dir / "best-f16.Modelfile").read_text().splitlines()[1] == "FROM ./best-f16.gguf"
    assert (export_dir / "best-q8_0.Modelfile").read_text().splitlines()[1] == "FROM ./best-q8_0.gguf"
    assert not list((run / "best").glob("*.gguf")) and not list((run / "best").glob("*Modelfile"))
    assert f"ollama create NAME -f {export_dir / 'best-q8_0.Modelfile'}" in capsys.readouterr().err


@pytest.fixture
def read_only_copy(tmp_path, tiny_models):
    """The tiny GPT-2 on a read-only filesystem (a tmpfs remounted read-only; needs root), else skip."""
    import os
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here")
    try:
        model = copy_model(tiny_models["gpt2"], mount / "m")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield model
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_read_only_folder_is_one_line_before_the_model_loads(read_only_copy, capsys, monkeypatch):
    def must_not_load(*args):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(export, "load_model", must_not_load)
    assert_refused(capsys, run_export("--model", read_only_copy), "cannot write the export into",
                   "Read-only file system", "--output FILE.gguf")


def test_sigterm_during_an_export_leaves_no_temporary_and_the_next_export_removes_a_killed_ones(tiny_models, tmp_path,
                                                                                              capsys, monkeypatch):
    import os
    import signal
    import subprocess

    model = copy_model(tiny_models["gpt2"], tmp_path / "m")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = model / f".tmp-model-q8_0.gguf-{int(dead.stdout)}"  # what kill -9 of a q8_0 export left
    killed.write_bytes(b"GGUF" + bytes(1000))
    real, written = gguf.GGUFWriter.write_tensor_data, []

    def terminated_midway(self, tensor, *args, **kwargs):
        if len(written) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled where it arrives
        written.append(tensor.nbytes)
        return real(self, tensor, *args, **kwargs)

    def outer_handler(signum, frame):  # where SIGTERM goes outside the export (not killing pytest if it fails)
        received.append(signum)

    received = []
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", terminated_midway)
    previous = signal.signal(signal.SIGTERM, outer_handler)
    try:
        code = run_export("--model", model)
        assert signal.getsignal(signal.SIGTERM) is outer_handler  # the export's own handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert code == 143 and received == [], (code, err)
    assert "Traceback" not in err and "error: stopped by SIGTERM while exporting to" in err, err
    assert sorted(p.name for p in model.iterdir() if "gguf" in p.name or "Modelfile" in p.name) == []
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", real)
    assert run_export("--model", model) == 0
    assert sorted(p.name for p in model.iterdir() if "gguf" in p.name or "Modelfile" in p.name) == [
        "model-f16.Modelfile", "model-f16.gguf"]


def test_newline_in_the_folder_name_and_a_huge_outtype(tiny_models, tmp_path, capsys):
    """A folder named `m\\nFROM ./evil.gguf` used to put that line into the Modelfile as an instruction; a
    100,000-character --outtype was echoed whole."""
    model = copy_model(tiny_models["gpt2"], tmp_path / "m\nFROM ./evil.gguf")
    assert run_export("--model", model) == 0
    lines = (model / "model-f16.Modelfile").read_text().splitlines()
    assert [line for line in lines if line.startswith("FROM")] == ["FROM ./model-f16.gguf"]
    assert "m\\nFROM ./evil.gguf" in lines[0] and lines[0].startswith("# Written by export.py")
    capsys.readouterr()
    assert run_export("--model", model, "--outtype", "x" * 100_000) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --outtype: invalid choice") and "(100,002 characters)" in err  # quotes too
    assert len(err) < 400, len(err)
    assert_refused(capsys, run_export("--model", model, "--output", tmp_path / "a\nFROM b.gguf"),
                   "has a control character")
    assert not (tmp_path / "a\nFROM b.gguf").exists()


@pytest.mark.parametrize("config", ["[]", '{"base_model_name_or_path": 7}'])
def test_adapter_config_not_an_object_or_a_number_for_base_is_one_line(tmp_path, capsys, config):
    pytest.importorskip("peft")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert_refused(capsys, run_export("--model", adapter), str(adapter / "adapter_config.json"))
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
