"""Models: a causal LM in memory and on disk, whichever script loads it. A module imports only the ones listed
before it:

    cpu_dropout   faster dropout masks on CPU
    loading       the one tokenizer/config/model loader; dropout, GELU fusion, optimizer; ModelFiles (how a
                  run writes its model, which LoRA and FSDP override)
    adapters      LoRA adapters on disk: their files, the base they name and its fingerprint, peft's presence
    folder        which saved model a --model folder means (model, LoRA adapter, training output); adapter loading
"""
