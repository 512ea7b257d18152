"""Formats: what the scripts write to disk and read back, with their checks. A module imports only the ones
listed before it:

    tokenfiles    token files without torch: meta.json format and checks, token dtype, fingerprints,
                  reading the splits back (reassemble: the inverse of the split)
    chat          chat/instruction records: formats, checks, the chat template, rendering to ids + loss mask
    checkpoints   the training state; checkpoint folders written, validated, pruned
"""
