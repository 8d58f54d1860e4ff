"""trustcore."""
