"""Tests of device_sim."""
