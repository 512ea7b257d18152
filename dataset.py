"""The token files of prepare_data.py for PyTorch: `TextDataset` (np.memmap blocks), the resumable sharded
epoch sampler and meta.json validation. The code lives in finetune/data/dataset.py; this module keeps the name
users import (`from dataset import TextDataset`)."""
from finetune.data.dataset import (
                           META_FORMAT,
                           META_VERSION,
                           SPLIT_FILES,
                           DataError,
                           EpochShuffleSampler,
                           TextDataset,
                           check_data_matches_model,
                           data_fingerprint,
                           load_meta,
                           token_dtype,
                           tokenizer_fingerprint,
                           validation_blocks,
)
from finetune.train.plan import steps_per_epoch

__all__ = ["META_FORMAT", "META_VERSION", "SPLIT_FILES", "DataError", "EpochShuffleSampler", "TextDataset",
           "check_data_matches_model", "data_fingerprint", "load_meta", "steps_per_epoch", "token_dtype",
           "tokenizer_fingerprint", "validation_blocks"]
