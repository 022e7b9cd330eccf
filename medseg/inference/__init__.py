"""Inference: a checkpoint becomes a Predictor (model + preprocessing); sliding-window tiling, TTA."""
