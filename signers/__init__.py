"""signers."""
