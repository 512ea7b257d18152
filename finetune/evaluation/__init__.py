"""evaluate.py's rooms, each importing only the ones listed before it:

    metrics    the figures (loss, perplexity, bits per byte, word perplexity, accuracy) from summed totals
    windows    which tokens each forward pass sees and scores: lm-eval's rolling windows, strided windows,
               from a stream of a document's tokens
    parallel   --nproc / torchrun: which batches this process runs, the sums added across processes
    scoring    a loaded model that scores windows and continuations in batches, and greedy completions
    documents  --input files as documents (the readers of prepare_data.py), read lazily, text files in pieces
    datadir    the val split of a --data-dir, in the blocks the training script scores
    preference the val pairs of a --data-dir of preference data: preference and DPO reward accuracy
    perplexity --input documents scored whole, streamingly: loss, bits per byte, word perplexity, per input and document
    tasks      --tasks files: multiple choice and exact match
    lmeval     --lm-eval: lm-evaluation-harness on the loaded models (optional package)
    report     eval.json, eval.md, the plot and the console table
    card       the report card and model card README.md written at the end of a training run

A kind of data evaluate.py scores is an `Evaluation` (scoring.py): a name and a `run(scorer)` that returns
a Result of figures; a new kind is one more class of that shape (preference.py is one).
"""
