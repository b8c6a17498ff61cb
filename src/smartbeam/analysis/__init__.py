"""Pure science: numpy/scipy/scikit-learn only, no bluesky, no ophyd, no I/O."""
