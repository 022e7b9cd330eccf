"""The model zoo: U-Net, SegNet (and SegNet-Basic), FCN-32s/16s/8s, in 2D and 3D.

Every model registers itself by name when its module is imported below, so
``build_model(cfg)`` can build any of them from a config; ``list_models()`` shows the
names. All take ``spatial_dims`` (2 or 3), ``in_channels``, ``out_channels`` and a
base width ``features``, and expose ``size_divisor``: the multiple every spatial size
of an input must be.
"""

from medseg.models.blocks import InputSizeError
from medseg.models.base import SegmentationModel
from medseg.models.fcn import FCN
from medseg.models.registry import build_model, list_models, model_options, register_model
from medseg.models.segnet import SegNet, SegNetBasic
from medseg.models.summary import model_summary
from medseg.models.unet import UNet, unet_valid_input_size, unet_valid_output_size

__all__ = [
    "FCN",
    "SegmentationModel",
    "InputSizeError",
    "SegNet",
    "SegNetBasic",
    "UNet",
    "build_model",
    "list_models",
    "model_options",
    "model_summary",
    "register_model",
    "unet_valid_input_size",
    "unet_valid_output_size",
]
