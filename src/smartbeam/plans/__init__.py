"""Bluesky plans (generators) of smartbeam; every one is queueable."""

from .stxm import stxm_image
from .xmcd import xmcd_adaptive_scan, xmcd_dense_scan

__all__ = ["stxm_image", "xmcd_adaptive_scan", "xmcd_dense_scan"]
