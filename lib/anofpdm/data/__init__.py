"""Data: BraTS / MSD readers (``brats``), slice preparation (``slices``), synthetic cases (``synth``)."""
