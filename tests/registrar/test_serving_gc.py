"""A serving registrar's cycle collector (``registrar.cli_run.serving_gc``): start-up objects
frozen, young collections less often, and cyclic garbage still collected on its own."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import gc
from registrar.cli_run import SERVING_GC_THRESHOLD, serving_gc

serving_gc()
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
assert gc.get_threshold()[0] == SERVING_GC_THRESHOLD
alive = 0

class Node:
    def __init__(self):
        global alive
        alive += 1
        self.other = self

    def __del__(self):
        global alive
        alive -= 1

for _ in range(200_000):
    Node()  # a cycle: only the collector frees it
print(alive)
"""


def test_cycles_are_still_collected_without_an_explicit_collect() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    alive = int(out.stdout.strip())
    assert 0 <= alive <= 3 * 20_000, alive  # bounded by the young threshold, not 200,000
