"""Tests of hq."""
