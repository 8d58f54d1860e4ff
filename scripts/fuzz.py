#!/usr/bin/env python3
"""Coverage-guided fuzzing of every parser that sees outside input (``tests/fuzz/targets.py``).

    scripts/fuzz.py --minutes 10                 # every target, time split evenly
    scripts/fuzz.py --seconds 30 --target csr    # one target
    scripts/fuzz.py --minutes 10 --engine mutator

Engines: ``atheris`` (libFuzzer, coverage of the instrumented trustcore / hq / registrar
bytecode; the default when it is installed) or ``mutator`` (this script's own loop: the
mutations of ``tests/fuzz/mutate.py``, keeping every input that reaches a new line of the
project's code, measured with ``sys.settrace``). Each target runs in its own process,
one after the other, starting from the genuine inputs of ``tests/fuzz/world.py``.

A crash is anything but the target's documented exception root escaping. The first input
of each new crash (exception type + innermost project frame) is written to
``tests/fuzz_corpus/<target>/`` (``--corpus-out``), where ``tests/project/test_fuzz_corpus.py``
replays it. The last line of output is one JSON object: engine, seconds, inputs tried,
crashes found (inputs), unique crashes, and the same per target. Exit 0 when no crash
was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from signers.private_files import write_private_file

ROOT = Path(__file__).resolve().parent.parent
INSTRUMENT = ["trustcore", "hq", "registrar", "signers"]
_INSTRUMENTED_MODULES = ("trustcore.registration", "trustcore.site_bundle", "trustcore.quorum",
                         "hq.audit_ingest", "hq.audit_verify", "hq.audit_reconcile",
                         "hq.audit_manifest", "hq.counterfeit", "hq.site", "hq.approvals",
                         "hq.approval_server", "registrar.service")  # fmt: skip


def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- the child


class _Stats:
    """What one child found; rewritten to ``path`` as it goes (libFuzzer ends the process
    with a C ``exit``, so nothing at the end of the Python program is guaranteed to run)."""

    def __init__(self, path: Path, target: str, corpus_out: Path) -> None:
        self.path, self.target, self.corpus_out = path, target, corpus_out
        self.inputs = 0
        self.crashes = 0
        self.signatures: dict[str, str] = {}
        self.kept = 0  # inputs kept for new coverage (mutator engine)
        self.last_write = 0.0

    def record(self, crash: Any | None) -> None:
        self.inputs += 1
        if crash is not None:
            self.crashes += 1
            if crash.signature not in self.signatures:
                self.signatures[crash.signature] = crash.message
                folder = self.corpus_out / self.target
                folder.mkdir(parents=True, exist_ok=True)
                (folder / crash.file_name).write_bytes(crash.data)
                print(f"CRASH {self.target}: {crash.signature}: {crash.message}", flush=True)
            self.write()
        elif time.monotonic() - self.last_write > 1.0:
            self.write()

    def write(self) -> None:
        self.last_write = time.monotonic()
        doc = {
            "target": self.target,
            "inputs": self.inputs,
            "crashes": self.crashes,
            "unique_crashes": len(self.signatures),
            "signatures": self.signatures,
            "kept": self.kept,
        }
        write_private_file(self.path, json.dumps(doc).encode(), overwrite=True, sync=False)


def _child_atheris(target_name: str, seconds: int, stats_path: Path, corpus_out: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=INSTRUMENT):
        # instrumented here, before the targets import them
        for module in _INSTRUMENTED_MODULES:
            importlib.import_module(module)
    from tests.fuzz.targets import TARGETS, run_one, seeds_of
    from tests.fuzz.world import build_fuzz_world

    target = TARGETS[target_name]
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target_name}-"))
    world = build_fuzz_world(work / "world")
    seeds_dir = work / "corpus"
    seeds_dir.mkdir()
    for i, seed in enumerate(seeds_of(target, world)):
        (seeds_dir / f"seed-{i}").write_bytes(seed)
    stats = _Stats(stats_path, target_name, corpus_out)
    stats.write()

    def one_input(data: bytes) -> None:
        stats.record(run_one(target, world, data))

    atheris.Setup(
        [sys.argv[0], str(seeds_dir), f"-max_total_time={seconds}", "-max_len=65536",
         "-timeout=30", "-rss_limit_mb=3072", "-print_final_stats=1"],
        one_input,
    )  # fmt: skip
    atheris.Fuzz()


def _child_mutator(target_name: str, seconds: int, stats_path: Path, corpus_out: Path) -> None:
    from tests.fuzz.mutate import mutate
    from tests.fuzz.targets import TARGETS, run_one, seeds_of
    from tests.fuzz.world import build_fuzz_world

    target = TARGETS[target_name]
    world = build_fuzz_world(Path(tempfile.mkdtemp(prefix=f"fuzz-{target_name}-")) / "world")
    corpus = list(seeds_of(target, world))
    covered: set[tuple[str, int]] = set()
    roots = tuple(str(ROOT / d) for d in INSTRUMENT)

    def lines_of(data: bytes) -> tuple[set[tuple[str, int]], Any]:
        hit: set[tuple[str, int]] = set()

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                hit.add((frame.f_code.co_filename, frame.f_lineno))
            return local

        def global_(frame: Any, event: str, arg: Any) -> Any:
            return local if frame.f_code.co_filename.startswith(roots) else None

        sys.settrace(global_)
        try:
            crash = run_one(target, world, data)
        finally:
            sys.settrace(None)
        return hit, crash

    stats = _Stats(stats_path, target_name, corpus_out)
    rng = random.Random(os.getpid())  # noqa: S311 - fuzzing, not cryptography
    for seed in corpus:
        hit, crash = lines_of(seed)
        covered |= hit
        stats.record(crash)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = mutate(rng.choice(corpus), rng, corpus)
        hit, crash = lines_of(data)
        if not hit <= covered:
            covered |= hit
            corpus.append(data)
            stats.kept += 1
        stats.record(crash)
    stats.write()


# -------------------------------------------------------------------------- the parent


def _run_target(
    name: str, seconds: int, engine: str, corpus_out: Path, work: Path
) -> dict[str, Any]:
    stats_path = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name,
           "--seconds", str(seconds), "--engine", engine, "--stats", str(stats_path),
           "--corpus-out", str(corpus_out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done = subprocess.run(  # noqa: S603 - this very script, argv list, no shell
        cmd, env=env, capture_output=True, text=True, timeout=seconds + 300, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("CRASH"):
            print(line, flush=True)
    try:
        result: dict[str, Any] = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        result = {"target": name, "inputs": 0, "crashes": 0, "unique_crashes": 0,
                  "signatures": {}, "error": " | ".join(tail)}  # fmt: skip
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="Total time, split over the targets.")
    budget.add_argument("--seconds", type=int, help="Time per target.")
    parser.add_argument("--target", action="append", help="Fuzz only this target (repeat).")
    parser.add_argument("--engine", choices=["atheris", "mutator"])
    parser.add_argument("--corpus-out", type=Path, default=ROOT / "tests" / "fuzz_corpus")
    parser.add_argument("--list", action="store_true", help="List the targets and exit.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    engine = args.engine or ("atheris" if _have_atheris() else "mutator")
    if engine == "atheris" and not _have_atheris():
        parser.error("atheris is not installed (pip install atheris), use --engine mutator")

    if args.child:
        sys.path.insert(0, str(ROOT))
        child = _child_atheris if engine == "atheris" else _child_mutator
        child(args.child, args.seconds, args.stats, args.corpus_out)
        return 0

    sys.path.insert(0, str(ROOT))
    from tests.fuzz.targets import TARGETS

    names = args.target or sorted(TARGETS)
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; --list shows them")
    if args.list:
        print("\n".join(sorted(TARGETS)))
        return 0
    if args.seconds is not None:
        per_target = args.seconds
    else:
        per_target = max(5, int((args.minutes or 1.0) * 60 / len(names)))
    results = []
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        for name in names:
            r = _run_target(name, per_target, engine, args.corpus_out, Path(tmp))
            results.append(r)
            note = f" ERROR {r['error']}" if "error" in r else ""
            print(
                f"{name:<26} {r['inputs']:>8} inputs  {r['crashes']:>4} crashes "
                f"({r['unique_crashes']} unique)  {r['seconds']:>6} s{note}",
                flush=True,
            )
    summary = {
        "engine": engine,
        "seconds_per_target": per_target,
        "targets": len(results),
        "inputs": sum(r["inputs"] for r in results),
        "crashes": sum(r["crashes"] for r in results),
        "unique_crashes": sum(r["unique_crashes"] for r in results),
        "errors": [r["target"] for r in results if "error" in r],
        "per_target": {
            r["target"]: {k: r[k] for k in ("inputs", "crashes", "unique_crashes", "signatures")}
            for r in results
        },
    }
    print(json.dumps(summary, sort_keys=True))
    return 1 if summary["crashes"] or summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
