"""Data: corpora, task datasets, and activation collection."""
