"""Fuzz targets for every parser that sees outside input (shared by the hypothesis tests
``tests/project/test_fuzz_*.py`` and the coverage-guided run ``scripts/fuzz.py``)."""
