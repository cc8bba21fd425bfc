"""Infer tasks of the app."""

from .anofpdm import AnoFPDM

__all__ = ["AnoFPDM"]
