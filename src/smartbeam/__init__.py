"""smartbeam: faster synchrotron and neutron measurements with analysis built into the scan.

Three methods, each usable live inside a Bluesky run and afterwards on stored runs:

* live KDE smoothing of SANS/SAXS area-detector frames (:mod:`smartbeam.analysis.kde`),
* Gaussian-process adaptive XAS/XMCD energy scans (:mod:`smartbeam.analysis.gp`),
* similarity-based estimation of the crystal-field parameter 10Dq
  (:mod:`smartbeam.analysis.tendq`).
"""

from .errors import SmartbeamError, SmartbeamInputError

__version__ = "0.1.0"

__all__ = ["SmartbeamError", "SmartbeamInputError", "__version__"]
