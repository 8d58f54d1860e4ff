"""Tests of trustcore."""
