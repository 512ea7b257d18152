"""Runtime: where and how the tensors run, in one process or several. A module imports only the ones listed
before it:

    device        device, precision, autocast, seeds, library versions
    distributed   torchrun: process group, barrier, all-reduce (no-ops in one process)
    launcher      --nproc N: starts the N processes itself with torch's launcher, answers for them
"""
