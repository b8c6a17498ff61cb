"""Readers of measured data files (spectra, raw detector frames)."""
