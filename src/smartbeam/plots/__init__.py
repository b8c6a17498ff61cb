"""Matplotlib figures (Agg backend, PNG files) of smartbeam results."""
