"""Property-based fuzzing of every parser that sees outside input (``tests/fuzz/targets.py``).

Each target gets genuine inputs mutated byte by byte (flips, +-1, interesting values,
truncation, insertion, splices; ``tests/fuzz/mutate.py``) and plain random bytes. The
property: only the package's documented exception root (``TrustCoreError`` in the core,
``HqError`` at HQ) escapes — a clean refusal — and a refused HQ input changes nothing.

The ``fuzz`` profile is fixed (derandomized, fixed example counts, no deadline) so this
bounded run costs the same every time (~30 s); ``scripts/fuzz.py --minutes N`` is the long,
coverage-guided run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.hq import db_dump
from tests.fuzz.mutate import mutate
from tests.fuzz.targets import TARGETS, Target, run_one, seeds_of
from tests.fuzz.world import FuzzWorld, build_fuzz_world

settings.register_profile(
    "fuzz",
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FUZZ = settings.get_profile("fuzz")
#: HQ targets open the database (and some the keystore) per input: fewer examples.
HQ_EXAMPLES = 120


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzWorld]:
    yield build_fuzz_world(tmp_path_factory.mktemp("fuzz"))


def _check(target: Target, world: FuzzWorld, data: bytes) -> None:
    crash = run_one(target, world, data)
    assert crash is None, f"{crash.signature}: {crash.message} (input {data.hex()})"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_are_accepted_or_refused_cleanly(world: FuzzWorld, name: str) -> None:
    """The genuine inputs themselves go through (the targets reach their parsers)."""
    target = TARGETS[name]
    seeds = seeds_of(target, world)
    assert seeds
    for seed in seeds:
        _check(target, world, seed)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_inputs_are_refused_cleanly(world: FuzzWorld, name: str) -> None:
    target = TARGETS[name]
    seeds = seeds_of(target, world)
    examples = HQ_EXAMPLES if target.restores else FUZZ.max_examples

    @settings(FUZZ, max_examples=examples)
    @given(st.integers(0, len(seeds) - 1), st.integers(0, 2**32 - 1))
    def mutated(index: int, seed: int) -> None:
        _check(target, world, mutate(seeds[index], random.Random(seed), seeds))

    mutated()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_random_bytes_are_refused_cleanly(world: FuzzWorld, name: str) -> None:
    target = TARGETS[name]

    @settings(FUZZ, max_examples=20)
    @given(st.binary(max_size=2048))
    def random_bytes(data: bytes) -> None:
        _check(target, world, data)

    random_bytes()


@pytest.mark.parametrize("name", ["hq_enrol_station", "hq_ingest_report", "hq_ingest_audit"])
def test_refused_hq_inputs_change_nothing(world: FuzzWorld, name: str) -> None:
    """A refusal stores nothing: the database is the same before and after."""
    target = TARGETS[name]
    seeds = seeds_of(target, world)
    rng = random.Random(11)
    before = db_dump(world.hq.home)
    refused = 0
    for _ in range(15):
        data = mutate(seeds[0], rng, seeds)
        try:
            target.run(world, data)
        except target.allowed:
            refused += 1
            assert db_dump(world.hq.home) == before
        else:
            world.restore()
    assert refused
