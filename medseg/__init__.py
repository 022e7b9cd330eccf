"""medseg: batch segmentation of medical and microscopy images."""

__version__ = "0.1.0"
