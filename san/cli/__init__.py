"""Console entry points: thin shells around plain functions."""
