import numpy as np
import pytest

from medseg.geometry import Geometry, lps_to_ras
from medseg.data.phantoms import rotation


def test_spacing_direction_origin_of_rotated_grid():
    affine = np.eye(4)
    affine[:3, :3] = rotation((10, 20, 30)) @ np.diag([0.5, 0.7, 2.0])
    affine[:3, 3] = (1, 2, 3)
    g = Geometry(affine, (10, 12, 5))
    assert np.allclose(g.spacing, (0.5, 0.7, 2.0))
    assert np.allclose(g.direction, rotation((10, 20, 30)))
    assert g.origin == (1.0, 2.0, 3.0)


def test_world_maps_indices_through_affine():
    g = Geometry.from_spacing((4, 5, 6), (2.0, 3.0, 4.0), origin=(10, 20, 30))
    assert np.allclose(g.world([1, 2, 3]), (12, 26, 42))
    assert g.world(np.zeros((7, 3))).shape == (7, 3)


def test_orientation_codes():
    assert Geometry(np.eye(4), (2, 2, 2)).orientation == "RAS"
    assert Geometry(lps_to_ras(np.eye(4)), (2, 2, 2)).orientation == "LPS"
    flipped = np.diag([1.0, -1.0, -1.0, 1.0])
    assert Geometry(flipped, (2, 2, 2)).orientation == "RPI"


def test_mismatch_reports_shape_and_offset():
    a = Geometry.from_spacing((4, 4, 4), (1, 1, 1))
    assert a.mismatch(Geometry.from_spacing((4, 4, 4), (1, 1, 1))) is None
    assert "shape" in a.mismatch(Geometry.from_spacing((4, 4, 5), (1, 1, 1)))
    shifted = Geometry.from_spacing((4, 4, 4), (1, 1, 1), origin=(0.5, 0, 0))
    assert "0.5 mm" in a.mismatch(shifted)
    tiny = Geometry.from_spacing((4, 4, 4), (1, 1, 1), origin=(1e-5, 0, 0))
    assert a.mismatch(tiny) is None


def test_unknown_spacing_matches_any_grid_of_same_shape():
    a = Geometry.from_spacing((4, 4), (0.004, 0.004))
    b = Geometry.from_spacing((4, 4), (1, 1), spacing_known=False)
    assert a.mismatch(b) is None
    assert b.mismatch(Geometry.from_spacing((4, 5), (1, 1))) is not None


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        Geometry(np.eye(3), (2, 2, 2))
    with pytest.raises(ValueError):
        Geometry(np.eye(4), (2,))
