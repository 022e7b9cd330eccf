"""Review: the HTML page people open before they trust a batch, and the local server that shows it."""

from medseg.constants import DEFAULT_HOST
from medseg.review.batch import (
    DATA_FOLDER,
    LOOPBACK,
    MAX_EDGE,
    MAX_REQUEST_PATH,
    MAX_VOXELS,
    PAGE_NAME,
    ReviewError,
    class_legend,
    find_learning_curves,
    read_batch,
    review_is_stale,
)
from medseg.review.page import write_review
from medseg.review.server import ReviewServer

__all__ = [
    "DATA_FOLDER",
    "DEFAULT_HOST",
    "LOOPBACK",
    "MAX_EDGE",
    "MAX_REQUEST_PATH",
    "MAX_VOXELS",
    "PAGE_NAME",
    "ReviewError",
    "ReviewServer",
    "class_legend",
    "find_learning_curves",
    "read_batch",
    "review_is_stale",
    "write_review",
]
