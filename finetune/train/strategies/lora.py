"""--lora-r: low-rank adapters on a frozen base, with peft. The work is finetune/train/lora.py's (the converter, the
adapter checkpoints, the merged releases); this says when the run asks for it."""
from __future__ import annotations

from pathlib import Path

from finetune.models import adapters
from finetune.train import lora

from .base import Strategy


class LoraStrategy(Strategy):
    name = "lora"
    trains_adapters = True
    loads_base = True  # a LoRA checkpoint holds the adapter and tokenizer, never the frozen base

    def tokenizer_and_config(self, resume_path: Path | None):
        """A LoRA checkpoint holds the adapter and tokenizer; the config is the base's."""
        if resume_path is None:
            return super().tokenizer_and_config(None)
        from finetune.models.loading import load_config, load_tokenizer

        return load_tokenizer(str(resume_path)), load_config(self.cfg.model)

    def model_problems(self, model_config, fingerprints: dict, state: dict | None) -> tuple[list[str], dict | None]:
        """Wrong targets, a model peft cannot wrap, another base: all before the weights load."""
        problems, counts = lora.check_on_meta_model(self.cfg, model_config)
        fingerprints["base_fingerprint"] = adapters.base_fingerprint(self.cfg.model)
        if state is not None:
            problems += lora.resume_problems(state, fingerprints["base_fingerprint"], self.cfg.model)
        return problems, counts

    def memory_per_process(self, model_config, n_params: int, plan, precision: str, world_size: int, device,
                           sharing, lora_counts: dict | None) -> tuple[float, str | None]:
        """The frozen base and the adapters, replicated: no DDP-against-FSDP line (--fsdp takes no --lora-r)."""
        from finetune.train.plan import estimate_memory_gib

        return estimate_memory_gib(model_config, n_params, self.cfg, plan, precision, lora_counts, device.type), None

    def card_rows(self) -> list[tuple[str, str]]:
        cfg = self.cfg
        return [("LoRA", f"r {cfg.lora_r}, alpha {lora.alpha(cfg):g}, dropout {lora.dropout(cfg):g}")]  # as trained

    def convert(self, model, tokenizer, model_source: str, precision: str):
        """The base frozen, adapters added (from the checkpoint on a resume)."""
        return lora.to_lora(model, self.cfg, tokenizer, model_source, precision)
