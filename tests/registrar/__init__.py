"""Tests of registrar."""
