"""One TaskConfig per model, each in a module named after the model."""

from .anofpdm import AnoFPDM

__all__ = ["AnoFPDM"]
