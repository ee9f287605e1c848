"""interplab.data.corpus."""
