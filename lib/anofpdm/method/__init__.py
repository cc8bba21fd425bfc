"""The AnoFPDM method on slices and volumes (docs/method.md): diffusion schedule, network and checkpoint, forward
process, decisions, post-processing, calibration and the volume pipeline. Imports ``anofpdm.volumes`` and the
shared helpers only."""
