"""Resumable labelling runs: the run directory, its records and configuration, and the
loop that labels what is missing."""
