"""interplab.dictionaries."""
