"""Input volumes: reading, checks with clear errors, alignment of the T2 to the FLAIR, intensity normalisation,
slicing to the network grid and back, overlap measures and DICOM writing. Knows no network and imports no other
part of the package."""
