"""Core: what every script shares and nothing in it needs torch. A module imports only the ones listed
before it:

    errors      one error style (UserError -> one `error:` line, exit 2), exit codes, failed writes
    fsio        atomic writes of folders and files (what a run did not write is moved aside, never deleted),
                fsync, CRC32, the output-folder lock (never through a link), SIGTERM as an exception
    console     the logging setup every script uses
    flags       the flags several scripts share, each defined once (meaning, choices, how it repeats)
    cli         flags generated from settings dataclasses (one --help group per dataclass), --config FILE
    outdir      the output folder of any script: created, locked, checked (train/rundir adds a run's rules)
"""
