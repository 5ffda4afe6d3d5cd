"""Correctness constants shared by both backends, each with its source.

Changing one of these changes what "correct" means for every test; keep them here and nowhere else.
"""

# Alpha is capped so that no single Gaussian makes a pixel fully opaque, which would make the
# back-to-front backward pass divide by (1 - alpha) = 0.
# Source: Kerbl et al. 2023 (3DGS) CUDA rasterizer, `min(0.99f, ...)`; Dynamic 3D Gaussians uses it.
ALPHA_CAP = 0.99

# Contributions whose alpha is below 1/255 are skipped: they cannot change an 8-bit image.
# Source: 3DGS paper Sec. 6 / forward.cu `if (alpha < 1.0f / 255.0f) continue;`
MIN_ALPHA = 1.0 / 255.0

# A pixel stops *before* the Gaussian that would take its transmittance below this value
# (that Gaussian is not blended). Source: 3DGS forward.cu `if (test_T < 0.0001f) done = true`.
TRANSMITTANCE_STOP = 1e-4

# Transmittance at which the median depth is read (camera z of the Gaussian where T first drops
# below 0.5). Source: diff-gaussian-rasterization-w-depth @ cb65e4b ("updated to median depth").
MEDIAN_TRANSMITTANCE = 0.5

# Added to both diagonal entries of the 2D covariance (EWA low-pass filter, Zwicker et al. 2001):
# every splat covers at least about one pixel. Source: 3DGS forward.cu `cov[0][0] += 0.3f`.
EPS2D = 0.3

# Pixels per tile side. Source: 3DGS config.h BLOCK_X = BLOCK_Y = 16; gsplat default tile_size=16.
TILE_SIZE = 16

# Upper bound on the extent of a splat in standard deviations. With the opacity-aware extent
# sqrt(2 ln(255 o)) (StopThePop, Radl et al. 2024; gsplat 1.5) alpha drops below 1/255 exactly at
# the boundary; 3.33 sigma is where even o = 1 gives alpha < 1/255 (exp(-3.33^2 / 2) = 0.0039).
MAX_EXTENT_SIGMAS = 3.33

# Guard band of the Jacobian clamp, as a fraction of the image size on each side: inside J only,
# x/z is clamped to [-(cx + 0.15 W) / fx, (W - cx + 0.15 W) / fx] (gsplat 1.5 `persp_proj`).
# Without it, Gaussians far outside the view get huge, unstable 2D covariances.
CLAMP_MARGIN = 0.15

# Default near/far culling planes in camera z (gsplat 1.5 defaults).
NEAR_PLANE = 0.01
FAR_PLANE = 1e10

# Real spherical-harmonics constants (3DGS / gsplat basis), degree 0..3.
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
         0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)
MAX_SH_DEGREE = 3

# --- The original renderer (diff-gaussian-rasterization-w-depth), used only by tritonsplat.compat ---
# Hard-coded near cull in its preprocess (`p_view.z <= 0.2f`).
INRIA_NEAR_PLANE = 0.2
# Symmetric guard band of its Jacobian clamp: x/z in [-1.3 tan(fovx), 1.3 tan(fovx)].
INRIA_CLAMP_TANFOV = 1.3
# Its radius: ceil(3 sqrt(lambda_max)) with lambda = mid +- sqrt(max(0.1, mid^2 - det)).
INRIA_RADIUS_SIGMAS = 3.0
INRIA_EIGEN_FLOOR = 0.1
# Median depth where transmittance never falls below 0.5.
INRIA_EMPTY_DEPTH = 15.0
