"""Data: the token files served to PyTorch, as blocks of text, packed examples or packed pairs. A module imports
only the ones listed before it:

    dataset   memmap dataset and resumable sampler (dataset.py at the top level re-exports it)
    packing   chat data: whole examples packed into blocks, labels, restarting positions
    pairs     preference data: pairs packed into blocks as two sequences each, slots, the reference
"""
