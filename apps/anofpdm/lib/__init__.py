"""The AnoFPDM MONAI Label app's own package (``configs``, ``infers``, input resolution, serving)."""
