"""The data pipeline of prepare_data.py: text and records in, train.bin / val.bin / meta.json out (README.md
draws it). A module imports only the ones listed before it (and the package rooms below finetune/prepare):

    piece       the Piece: a stretch of input text, its split and source, passed from room to room
    settings    the frozen Settings the pipeline takes (prepare_data.py builds it from the flags)
    lines       a record file's bytes as decoded lines with their offsets (JSON lines, CSV/TSV), its sha256
    jsonrecords JSON lines and .json files, value by value
    csvrecords  CSV and TSV files: the header checked, row by row
    parquetrecords  Parquet files (pyarrow): the text column, or whole rows
    records     record inputs: the reader by extension, the text field, what was skipped; whole records
    sources     the inputs: files and folders walked, the checks that need no tokenizer
    recorded    the tokenizer recorded by an earlier run, loaded without transformers
    engines     tokenizer loading; ids from text: Hugging Face tokenizers, the tiktoken fast path
    cuts        the safe-cut proof and the Cutter
    split       validation ranges in the byte stream
    stream      pieces: the inputs cut at safe places, labelled train or val
    chatstream  chat records -> examples (ids + loss mask, finetune/formats/chat.py), whole records per split
    writer      token files under temporary names, the tally, meta.json, the publish
    pipeline    pieces -> ids -> files, the checks on what came out
"""
