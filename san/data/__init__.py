"""Datasets: the VTAB-1K folder format, FGVC json splits, and the offline demo suite."""
