"""The MR sequences the project reads, by canonical name, and the channel order of 4-D MSD Task01 images.

Data loading (:mod:`anofpdm.data.brats`) and the serving reader (:mod:`anofpdm.volumes.reading`) both take them
from here.
"""

from __future__ import annotations

__all__ = ["SEQUENCES", "MSD_CHANNELS"]

SEQUENCES = ("flair", "t1", "t1ce", "t2")
MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")  # Task01: FLAIR, T1w, T1gd, T2w
