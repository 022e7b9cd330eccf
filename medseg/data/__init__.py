"""Data for training: datasets and splits, the manifest, sampling, augmentation, MONAI preprocessing and its
inversion, the U-Net paper's weight maps, and generated phantoms."""
