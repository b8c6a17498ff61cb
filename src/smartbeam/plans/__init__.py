"""Bluesky plans (generators) of smartbeam; every one is queueable."""

from .sans import sans_kde_count
from .stxm import stxm_image
from .xmcd import xmcd_adaptive_scan, xmcd_dense_scan

__all__ = ["sans_kde_count", "stxm_image", "xmcd_adaptive_scan", "xmcd_dense_scan"]
