"""Ground-truth sample physics of the simulated instruments (never visible to plans)."""
