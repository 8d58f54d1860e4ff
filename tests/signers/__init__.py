"""Tests of signers."""
