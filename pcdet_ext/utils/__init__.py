"""Small utilities: checkpoint I/O."""
