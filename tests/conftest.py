"""Shared fixtures: a test PKI built in code and real swtpm instances on ephemeral ports."""

pytest_plugins = ["tests.fixtures.pki", "tests.fixtures.swtpm", "tests.fixtures.postgres"]
