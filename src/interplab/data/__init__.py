"""interplab.data."""
