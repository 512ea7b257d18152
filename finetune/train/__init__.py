"""Training: what a run of finetune_generative.py is made of. A module imports only the ones listed before
it:

    config        the training script's settings: TrainConfig, its flag groups, their validation
    plan          steps, evaluation schedule, memory and time estimates (--dry-run)
    loss          next-token loss, validation loss
    metrics       metrics.jsonl, loss.png
    trackers      --report-to: TensorBoard, MLflow, trackio, W&B (local, optional packages)
    rundir        the output folder of a run: lock, clobber and overlap refusal, resume command
    lora          LoRA with peft: the converter, adapter checkpoints, merged releases
    fsdp          --fsdp: FSDP2 sharding of the blocks, checkpoints as DCP shards, gathered releases
    objectives/   what a run trains, one module each (text, chat, preference/DPO) behind one interface the
                  loop, preflight, build and evaluation ask; chosen by meta.json
    strategies/   how a run trains the weights, one module each (full, lora, fsdp) behind one interface the
                  preflight, build and training step ask; chosen once from the config (strategy_for)
    training      the run object the loop works with (record, evaluate, sample, save), stop requests, loaders
    preflight     what a run checks before its weights load (settings, resume, data vs model, plan, memory)
    build         a run assembled from its checks: model and converters, optimizer, schedule, data, resume
"""
