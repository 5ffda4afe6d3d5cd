"""Middlebury multi-view stereo (templeSparseRing, dinoSparseRing).

| check                                                               | tolerance / criterion         |
|---------------------------------------------------------------------|-------------------------------|
| K, R, t equal an independent parse of *_par.txt                      | 1e-9 (R: 1e-6, re-orthonorm.) |
| silhouettes (grey > 0.19) lie in the projection of the README bbox    | >= 97% of silhouette pixels   |
| hull points of 14 train views project into the 2 held-out silhouettes | >= 97% (2 px dilation)        |
| default split: index % 8 == 0 are test cameras                       | exact                         |
"""

from __future__ import annotations

import numpy as np
import pytest

from data_tools import load

from .helpers import middlebury_hull, parse_par, silhouette

BBOX = {
    "templeSparseRing": ((-0.073568, 0.021728, -0.012445), (0.028855, 0.181892, 0.062736)),
    "dinoSparseRing": ((-0.061897, -0.018874, -0.057845), (0.010897, 0.068227, 0.015495)),
}


@pytest.mark.parametrize("name", ["templeSparseRing", "dinoSparseRing"])
def test_cameras_match_par_file_and_bbox(name, request):
    path = request.getfixturevalue("temple" if name.startswith("temple") else "dino")
    seq = load(path, test_every=0)
    raw = parse_par(next(path.glob("*_par.txt")))
    assert seq.format == "middlebury" and len(seq.train_cameras) == len(raw) == 16
    lo, hi = BBOX[name]
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    for cam, (fname, K, R, t) in zip(seq.train_cameras, raw):
        assert seq.image_path(0, cam).name == fname
        np.testing.assert_allclose(cam.K, K, atol=1e-9)
        np.testing.assert_allclose(cam.R, R, atol=1e-6)
        np.testing.assert_allclose(cam.t, t, atol=1e-9)
        sil = silhouette(seq.image(0, cam))
        uv, z = cam.project(corners)
        assert (z > 0).all()
        jj, ii = np.nonzero(sil)
        inside = (ii + 0.5 >= uv[:, 0].min()) & (ii + 0.5 <= uv[:, 0].max())
        inside &= (jj + 0.5 >= uv[:, 1].min()) & (jj + 0.5 <= uv[:, 1].max())
        assert inside.mean() >= 0.97, (fname, inside.mean())


def test_split_and_hull_points_project_into_held_out_silhouettes(temple):
    seq = load(temple)
    assert [c.id for c in seq.test_cameras] == [0, 8]
    assert len(seq.train_cameras) == 14
    pts = middlebury_hull(seq.train_cameras, lambda c: silhouette(seq.image(0, c)), BBOX["templeSparseRing"])
    assert len(pts) > 500
    for cam in seq.test_cameras:
        assert _fraction_inside(cam, pts, silhouette(seq.image(0, cam))) >= 0.97


def _fraction_inside(cam, pts, sil, dilate=2):
    from .helpers import dilate_mask

    uv, z = cam.project(pts)
    sil = dilate_mask(sil, dilate)
    iu = np.clip(uv[:, 0], 0, cam.width - 1).astype(int)
    iv = np.clip(uv[:, 1], 0, cam.height - 1).astype(int)
    ok = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cam.height)
    return float((ok & sil[iv, iu]).mean())
