"""Evaluation: metrics, pairing a mask with its reference across grids, reports and plots."""
