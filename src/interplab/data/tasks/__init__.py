"""interplab.data.tasks."""
