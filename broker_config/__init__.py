"""broker_config."""
