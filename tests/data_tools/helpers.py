"""Small independent helpers for the data_tools tests (no data_tools code is used here)."""

from __future__ import annotations

import numpy as np


def parse_par(path):
    """[(name, K, R, t)] from a Middlebury *_par.txt, parsed independently of data_tools."""
    lines = path.read_text().split("\n")
    n = int(lines[0])
    out = []
    for line in lines[1 : n + 1]:
        f = line.split()
        v = np.array(f[1:], dtype=float)
        out.append((f[0], v[:9].reshape(3, 3), v[9:18].reshape(3, 3), v[18:21]))
    return out


def silhouette(image):
    """The Middlebury README recipe's first step: grey value above 0.19 (dark background)."""
    return np.asarray(image).mean(-1) > 0.19


def dilate_mask(mask, r):
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def project(K, R, t, X):
    Xc = X @ R.T + t
    uv = Xc[:, :2] / Xc[:, 2:] * np.diag(K)[:2] + K[:2, 2]
    return uv, Xc[:, 2]


def middlebury_hull(cams, sil_of, bbox, voxel=0.003):
    """Voxel centres (bbox grown by 1 cm) whose projection is in every camera's silhouette
    (dilated by 2 px to tolerate thresholding noise)."""
    lo, hi = np.array(bbox[0]) - 0.01, np.array(bbox[1]) + 0.01
    axes = [np.arange(a, b, voxel) + voxel / 2 for a, b in zip(lo, hi)]
    X = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    keep = np.ones(len(X), bool)
    for cam in cams:
        sil = dilate_mask(sil_of(cam), 2)
        uv, z = cam.project(X)
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cam.height)
        iu = np.clip(uv[:, 0], 0, cam.width - 1).astype(int)
        iv = np.clip(uv[:, 1], 0, cam.height - 1).astype(int)
        keep &= ~inside | sil[iv, iu]
    return X[keep]
