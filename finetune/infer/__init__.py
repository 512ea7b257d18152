"""Inference: text generation from a loaded model and tokenizer. A module imports only the ones listed before
it:

    sampling   text generation, shared by generate.py, evaluation and training-time samples
"""
