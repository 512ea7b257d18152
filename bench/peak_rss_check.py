"""run_polled's peak RSS when the parent is large: this process holds 2 GiB, then runs three children.

    python bench/peak_rss_check.py

A forked child's ru_maxrss starts at its parent's resident size and keeps it across exec, so a 2 GiB
parent would report 2 GiB for a child that never held more than 10 MB. run_polled must report each
child's own peak: a tiny one (~10 MiB), one holding 300 MiB and one holding 2.5 GiB (above the parent).
Exit status 1 when the tiny child's peak is 100 MiB or more, or another is off by more than 64 MiB.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_polled  # noqa: E402

CHILDREN = (("tiny", 0), ("300 MiB", 300), ("2.5 GiB", 2560))  # name, MiB it allocates and touches


def main() -> int:
    hog = bytearray(2 << 30)  # 2 GiB, every page touched: resident
    for i in range(0, len(hog), 4096):
        hog[i] = 1
    print(f"parent: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    wrong, base = 0, None
    for name, mib in CHILDREN:
        code = f"b = bytearray({mib} << 20); import time; time.sleep(0.5)"
        peak = run_polled([sys.executable, "-c", code])["peak_rss_mib"]
        base = peak if base is None else base  # the tiny child: the interpreter alone
        expected = base + mib
        ok = abs(peak - expected) <= 64 and base < 100
        wrong += not ok
        print(f"child {name:8s}: peak RSS {peak:6.0f} MiB (expected about {expected:.0f}) {'ok' if ok else 'WRONG'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
