"""AnoFPDM: anomaly segmentation with the forward process of diffusion models (brain MRI).

The method is described in ``docs/method.md`` terms throughout: guidance weight, end step, anomaly map,
cosine verdict and the quantile threshold of Algorithm 1.
"""

__version__ = "0.1.0"
