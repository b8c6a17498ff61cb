"""Document-stream consumers that turn raw events into derived streams of the same run."""

from .derived import DerivedStreamRouter, data_key_for
from .live_kde import LiveKDE
from .tendq import TenDqEstimator
from .xmcd_plot import XMCDLivePlot

__all__ = ["DerivedStreamRouter", "LiveKDE", "TenDqEstimator", "XMCDLivePlot", "data_key_for"]
