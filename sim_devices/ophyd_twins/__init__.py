"""In-process ophyd twins (no EPICS) with the same component names and physics as the
caproto IOCs, for fast unit tests of plans and callbacks."""

from .sans import SimSANSDetector
from .xmcd import SimXMCDEndstation

__all__ = ["SimSANSDetector", "SimXMCDEndstation"]
