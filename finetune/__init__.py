"""Support code of the scripts (prepare_data.py, finetune_generative.py, generate.py, export.py, evaluate.py), one room
per concern. Scripts import the package; the package never imports a script. Inside, a module imports
only the ones listed before it:

    errors        one error style (UserError -> one `error:` line, exit 2), exit codes, failed writes
    fsio          atomic writes of folders and files (what a run did not write is moved aside, never deleted),
                  fsync, CRC32, the output-folder lock (never through a link), SIGTERM as an exception
    outdir        the output folder of either script: created, locked, checked (rundir adds a run's rules)
    chat          chat/instruction records: formats, checks, the chat template, rendering to ids + loss mask
    distributed   torchrun: process group, barrier, all-reduce (no-ops in one process)
    launcher      --nproc N: starts the N processes itself with torch's launcher, answers for them
    runtime       device, precision, autocast, seeds, library versions
    console       the logging setup every script uses
    cli           flags generated from config dataclasses (one --help group per dataclass)
    config        the training script's settings: TrainConfig, its flag groups, their validation
    plan          steps, evaluation schedule, memory and time estimates (--dry-run)
    tokenfiles    token files without torch: meta.json format and checks, token dtype, fingerprints,
                  reading the splits back (reassemble: the inverse of the split)
    data          token files for PyTorch (memmap dataset, resumable sampler); dataset.py re-exports it
    packing       chat data: whole examples packed into blocks, labels, restarting positions
    pairs         preference data: pairs packed into blocks as two sequences each, slots, the reference
    loss          next-token loss, validation loss
    objectives/   what a run trains, one module each (text, chat, preference/DPO) behind one interface the
                  loop, preflight, build and evaluation ask; chosen by meta.json
    metrics       metrics.jsonl, loss.png
    trackers      --report-to: TensorBoard, MLflow, trackio, W&B (local, optional packages)
    models        the one tokenizer/config/model loader; dropout, GELU fusion, optimizer; ModelFiles (how a
                  run writes its model, which lora and fsdp override)
    prepare/      prepare_data.py's pipeline: sources -> pieces -> ids -> token files (its own README.md)
    cpu_dropout   faster dropout masks on CPU
    sampling      text generation, shared by generate.py and training-time samples
    checkpoints   the training state; checkpoint folders written, validated, pruned
    rundir        the output folder of a run: lock, clobber and overlap refusal, resume command
    lora          LoRA with peft: the converter, adapter checkpoints, merged releases
    fsdp          --fsdp: FSDP2 sharding of the blocks, checkpoints as DCP shards, gathered releases
    strategies/   how a run trains the weights, one module each (full, lora, fsdp) behind one interface the
                  preflight, build and training step ask; chosen once from the config (strategy_for)
    training      the run object the loop works with (record, evaluate, sample, save), stop requests, loaders
    preflight     what a run checks before its weights load (settings, resume, data vs model, plan, memory)
    build         a run assembled from its checks: model and converters, optimizer, schedule, data, resume
    modelfolder   which saved model a --model folder means (model, LoRA adapter, training output); adapter loading
    export/       export.py's room: GGUF file, its tokenizer metadata, Ollama's Modelfile
    evaluation/   evaluate.py's rooms (metrics, windows, scoring, documents, val split, tasks, lm-eval, report)
                  and the report card + model card a training run writes at its end (its own docstring)
"""
