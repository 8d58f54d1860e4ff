"""Tests of factory_station."""
