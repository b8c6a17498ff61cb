"""Caproto IOCs serving the simulated instruments over real EPICS Channel Access."""
