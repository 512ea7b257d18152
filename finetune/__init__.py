"""Support code of the scripts (prepare_data.py, finetune_generative.py, generate.py, export.py, evaluate.py).
Scripts import the package; the package never imports a script. The package is cut into layers, listed here
from the bottom up; a layer imports only itself and the layers listed before it (tests/test_layout.py checks
it), and inside a layer a module imports only the ones listed before it in the layer's own docstring:

    core        errors, atomic files, the console, the shared command line, output folders (no torch)
    runtime     devices, precision, seeds; torchrun's processes and the --nproc launcher
    formats     what lies on disk: meta.json and the token files, chat rendering, checkpoint folders
    models      a model in memory and on disk: loading, CPU dropout, saved adapters, which folder is which model
    data        token files for PyTorch: blocks, packed chat examples, packed preference pairs
    prepare     prepare_data.py's pipeline: sources -> pieces -> ids -> token files (its own README.md)
    infer       text generation, shared by generate.py, evaluation and training-time samples
    export      export.py's room: GGUF file, its tokenizer metadata, Ollama's Modelfile
    train       a training run: settings, plan, loss, checkpoints, objectives/ and strategies/, the run object
    evaluation  evaluate.py's rooms, and the report card + model card a training run writes at its end
"""
