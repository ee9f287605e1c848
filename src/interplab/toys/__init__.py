"""interplab.toys."""
