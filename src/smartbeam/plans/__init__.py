"""Bluesky plans (generators) of smartbeam; every one is queueable."""

from .gp_scan import gp_adaptive_scan
from .sans import sans_kde_count
from .stxm import stxm_image, stxm_xas_map, stxm_xmcd_stack
from .xas import xas_tendq_scan
from .xmcd import xmcd_adaptive_scan, xmcd_dense_scan

__all__ = ["gp_adaptive_scan", "sans_kde_count", "stxm_image", "stxm_xas_map",
           "stxm_xmcd_stack", "xas_tendq_scan", "xmcd_adaptive_scan", "xmcd_dense_scan"]
