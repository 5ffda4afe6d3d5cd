"""A browser viewer of a run (`tritonsplat-track view OUT`), on viser's Gaussian-splat rendering.

What the original's `visualize.py` (Open3D) shows, in a web page: frame t of the fit with a time slider and
play/pause; trajectory trails over the last `trail_length` frames (15) of every `trail_every`-th (25, i.e.
4 %) foreground Gaussian; toggles for the background Gaussians, segmentation colours (foreground red,
background blue) and the camera frustums with their images; "view from camera k" (or click a frustum).

Frames are read lazily from the run's HDF5 (TrackingResult keeps a few in memory): opening a 150-frame run
reads frame `frame` and, for the trails, the frames before it; nothing else until the slider moves.

viser is the optional extra `viewer` (pip install "tritonsplat[viewer]"), imported only here.
"""

from __future__ import annotations

import colorsys
import threading
import time
from pathlib import Path

import numpy as np

from .errors import TrackingError
from .result import TrackingResult

TRAIL_LENGTH = 15  # frames per trail (the original's traj_length)
TRAIL_EVERY = 25  # every 25th foreground Gaussian gets a trail: 4 % (the original's traj_frac)
FRUSTUM_IMAGE_WIDTH = 160  # px; the camera images only identify the view, small keeps the page responsive
PLAY_FPS = 10.0
TRAIN_FRUSTUM_RGB = (60, 60, 60)
TEST_FRUSTUM_RGB = (230, 120, 20)


def _import_viser():
    try:
        import viser
    except ImportError:
        raise TrackingError('the viewer needs the `viewer` extra: pip install "tritonsplat[viewer]" '
                            '(or pip install "viser>=1.1,<2")') from None
    return viser


def quats_to_rotmats(quats: np.ndarray) -> np.ndarray:
    """[N, 4] (w, x, y, z), any norm -> [N, 3, 3] float32 rotation matrices."""
    q = np.asarray(quats, np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    w, x, y, z = q.T
    R = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                  2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                  2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], 1)
    return R.reshape(-1, 3, 3).astype(np.float32)


def covariances(quats: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Sigma = R S^2 R^T (Kerbl et al. 2023, Eq. 6): [N, 4] quats, [N, 3] activated scales -> [N, 3, 3]."""
    R = quats_to_rotmats(quats)
    s2 = np.asarray(scales, np.float32) ** 2
    return np.einsum("nij,nj,nkj->nik", R, s2, R)


def trail_colours(n: int) -> np.ndarray:
    """[n, 3] uint8 distinct hues (golden-ratio steps), one per trail."""
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.61803398875) % 1.0, 0.85, 0.95)]
                     for i in range(n)], np.uint8).reshape(n, 3)


def camera_pose(cam) -> tuple[np.ndarray, np.ndarray, float]:
    """(wxyz [4] of R_world_camera, centre [3], vertical fov in radians) of a data_tools.Camera (OpenCV axes,
    as viser's cameras use)."""
    from viser import transforms

    c2w = np.linalg.inv(np.asarray(cam.w2c, np.float64))
    wxyz = transforms.SO3.from_matrix(c2w[:3, :3]).wxyz
    fov = 2.0 * np.arctan(cam.height / (2.0 * float(cam.K[1][1])))
    return np.asarray(wxyz), c2w[:3, 3], float(fov)


class RunViewer:
    """A viser server showing a run; `close()` stops it (also a context manager).

    Attributes:
        result: the TrackingResult.
        server: the viser.ViserServer.
        url: http://HOST:PORT of the page.
        frame: the frame shown.
        splats: the GaussianSplatHandle of the frame shown (its `buffer` holds one 32-byte row per splat).
        trails: the LineSegmentsHandle of the trails, or None when they are off (or no foreground).
        gui: {"frame", "play", "fps", "background", "segmentation", "cameras", "trails", "trail_length",
            "trail_every", "view_camera", "view"} -> viser GUI handles.
        frustums: {camera id: CameraFrustumHandle} while cameras are shown.
    """

    def __init__(self, out_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8080, frame: int = 0,
                 trail_length: int = TRAIL_LENGTH, trail_every: int = TRAIL_EVERY,
                 image_width: int = FRUSTUM_IMAGE_WIDTH):
        viser = _import_viser()
        self.result = TrackingResult(out_dir)
        n_frames = self.result.n_frames
        if n_frames < 1:
            raise TrackingError(f"{out_dir}: the run has no completed frame")
        if not 0 <= frame < n_frames:
            raise ValueError(f"--frame must be in 0..{n_frames - 1} (the run has {n_frames} frame(s)), got {frame}")
        if trail_length < 1 or trail_every < 1:
            raise ValueError(f"trail_length and trail_every must be >= 1, got {trail_length}, {trail_every}")
        self.n_frames, self.n_gaussians = n_frames, self.result.n_gaussians
        self.image_width = int(image_width)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._fg = self.result.fg.numpy()
        self._scales = self.result.scales.numpy().astype(np.float32)
        self._opacities = self.result.opacities.numpy().astype(np.float32)[:, None]
        # every Gaussian's label [N, 3]: the last frame holds every Gaussian of the run
        self._seg = self.result.params(n_frames - 1)["seg"].numpy().astype(np.float32)
        self._births = self.result.birth_frame.numpy()
        self._trail_means: dict[tuple[int, int], np.ndarray] = {}
        self._data = None
        self._data_failed = False
        self.cameras = self.result.train_cameras + self.result.test_cameras
        self.frustums: dict[int, object] = {}
        self.splats = None
        self.trails = None
        self.frame = int(frame)

        self.server = viser.ViserServer(host=host, port=int(port), verbose=False)
        try:
            # 0.0.0.0 / :: listen on every address; a browser on this machine reaches them at localhost.
            shown = "localhost" if host in ("0.0.0.0", "::", "") else host
            self.url = f"http://{shown}:{self.server.get_port()}"
            self._set_up_scene()
            self._build_gui(trail_length, trail_every)
            self.show(self.frame)
            self._player = threading.Thread(target=self._play_loop, name="viewer-play", daemon=True)
            self._player.start()
        except BaseException:
            self.server.stop()
            raise

    # ------------------------------------------------------------------ set-up
    def _set_up_scene(self) -> None:
        # The scene's up: the mean of the cameras' up vectors (-y of OpenCV camera axes), so that orbiting feels
        # natural whatever the data's world frame (Panoptic's is y-down).
        ups = [-np.linalg.inv(np.asarray(c.w2c, np.float64))[:3, 1] for c in self.cameras]
        up = np.mean(ups, 0)
        up = up / max(np.linalg.norm(up), 1e-12)
        self.server.scene.set_up_direction(tuple(float(v) for v in up))
        # Start from the first training camera's pose, looking along its axis at the depth of the foreground
        # (else of everything): the view the fit was trained on.
        means = self.result.means[self.frame].numpy()
        fg = self._fg[:len(means)]
        focus = means[fg] if fg.any() else means
        cam0 = self.result.train_cameras[0] if self.result.train_cameras else self.cameras[0]
        _, centre, fov = camera_pose(cam0)
        c2w = np.linalg.inv(np.asarray(cam0.w2c, np.float64))
        forward = c2w[:3, 2]
        depth = float(np.median((focus - centre) @ forward))
        look_at = centre + forward * (depth if depth > 0 else float(self.result.scene_radius))
        up = -c2w[:3, 1]
        position = centre
        self.home = {"position": position, "look_at": look_at, "up": up, "fov": fov}
        cam = self.server.initial_camera  # what "Reset View" returns to
        cam.position, cam.look_at, cam.up, cam.fov = (self.home[k] for k in ("position", "look_at", "up", "fov"))
        # viser 1.1's client starts from its built-in pose after an up-direction change: set each new one's.
        self.server.on_client_connect(self._home_client)

    def _home_client(self, client) -> None:
        with client.atomic():
            client.camera.up_direction = self.home["up"]
            client.camera.position = self.home["position"]
            client.camera.look_at = self.home["look_at"]
            client.camera.fov = self.home["fov"]

    def _build_gui(self, trail_length: int, trail_every: int) -> None:
        gui = self.server.gui
        self.gui: dict[str, object] = {}
        g = self.gui
        with gui.add_folder("Time"):
            g["frame"] = gui.add_slider("frame", min=0, max=max(self.n_frames - 1, 1), step=1, initial_value=self.frame,
                                        disabled=self.n_frames == 1)
            g["play"] = gui.add_checkbox("play", initial_value=False)
            g["fps"] = gui.add_number("frames/s", initial_value=PLAY_FPS, min=0.5, max=60.0, step=0.5)
        with gui.add_folder("Show"):
            g["background"] = gui.add_checkbox("background Gaussians", initial_value=True)
            g["segmentation"] = gui.add_checkbox("segmentation colours", initial_value=False)
            g["cameras"] = gui.add_checkbox("cameras and images", initial_value=False)
        with gui.add_folder("Trails"):
            g["trails"] = gui.add_checkbox("trails", initial_value=True)
            g["trail_length"] = gui.add_slider("length (frames)", min=1, max=max(2, self.n_frames), step=1,
                                               initial_value=min(trail_length, max(2, self.n_frames)))
            g["trail_every"] = gui.add_number("every k-th foreground", initial_value=int(trail_every), min=1, step=1)
        with gui.add_folder("View"):
            ids = [str(c.id) for c in self.cameras]
            g["view_camera"] = gui.add_dropdown("camera", options=ids, initial_value=ids[0])
            g["view"] = gui.add_button("view from camera")
        g["frame"].on_update(lambda _: self.show(int(g["frame"].value)))
        for key in ("background", "segmentation", "trails", "trail_length", "trail_every"):
            g[key].on_update(lambda _: self.show(self.frame))
        g["cameras"].on_update(lambda _: self._update_cameras())
        g["view"].on_click(lambda event: self.view_from_camera(int(g["view_camera"].value), event.client))

    # ------------------------------------------------------------------ drawing
    def show(self, t: int) -> None:
        """Draw frame t (splats, trails, camera images) for every client."""
        if not 0 <= t < self.n_frames:
            raise ValueError(f"frame must be in 0..{self.n_frames - 1}, got {t}")
        with self._lock:
            self.frame = int(t)
            if int(self.gui["frame"].value) != t:
                self.gui["frame"].value = t  # re-enters show() through the slider callback (an RLock)
                return
            p = self.result.params(t)   # the Gaussians alive at t (born at or before t)
            n = p["means"].shape[0]
            keep = (np.ones(self.n_gaussians, bool) if self.gui["background"].value else self._fg)[:n]
            colours = self._seg[:n] if self.gui["segmentation"].value else p["rgb"].numpy()
            with self.server.atomic():
                self.splats = self.server.scene.add_gaussian_splats(
                    "/gaussians", centers=p["means"].numpy()[keep].astype(np.float32),
                    covariances=covariances(p["quats"].numpy()[keep], self._scales[:n][keep]),
                    rgbs=np.clip(colours[keep], 0.0, 1.0).astype(np.float32), opacities=self._opacities[:n][keep])
                self._draw_trails(t)
                if self.gui["cameras"].value:
                    self._update_cameras()
            self.server.flush()

    def trail_indices(self) -> np.ndarray:
        """Indices of the Gaussians with a trail: every k-th foreground Gaussian (k = the GUI's value)."""
        every = max(1, int(self.gui["trail_every"].value))
        return np.flatnonzero(self._fg)[::every]

    def _trail_positions(self, t: int, every: int, idx: np.ndarray) -> np.ndarray:
        key = (t, every)
        if key not in self._trail_means:
            self._trail_means[key] = self.result.means[t].numpy()[idx].astype(np.float32)
        return self._trail_means[key]

    def _draw_trails(self, t: int) -> None:
        t0 = max(0, t - int(self.gui["trail_length"].value))
        idx = self.trail_indices()
        idx = idx[self._births[idx] <= t0]  # a trail starts at t0: only Gaussians that exist by then
        if not self.gui["trails"].value or len(idx) == 0 or t0 == t:
            if self.trails is not None:
                self.trails.remove()
                self.trails = None
            return
        every = int(self.gui["trail_every"].value)
        path = np.stack([self._trail_positions(s, every, idx) for s in range(t0, t + 1)], 1)  # [S, L + 1, 3]
        segments = np.stack([path[:, :-1], path[:, 1:]], 2).reshape(-1, 2, 3)
        colours = np.repeat(trail_colours(len(idx)), path.shape[1] - 1, 0)
        colours = np.repeat(colours[:, None], 2, 1)
        thickness = 0.002 * float(self.result.scene_radius)
        self.trails = self.server.scene.add_line_segments("/trails", points=segments, colors=colours,
                                                          thickness=thickness)

    def _sequence(self):
        if self._data is None and not self._data_failed:
            import data_tools

            spec = self.result.data
            try:
                self._data = data_tools.load(spec.path, downscale=spec.downscale, frames=spec.source_frames)
            except Exception as exc:  # moved or deleted data: frustums without images
                self._data_failed = True
                print(f"warning: camera images unavailable ({spec.path}: {exc})")
        return self._data

    def _camera_image(self, cam) -> np.ndarray | None:
        seq = self._sequence()
        if seq is None:
            return None
        try:
            image = np.asarray(seq.image(self.frame, cam.id))
        except Exception:
            return None
        step = max(1, image.shape[1] // self.image_width)
        image = image[::step, ::step, :3]
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        return image

    def _update_cameras(self) -> None:
        with self._lock:
            if not self.gui["cameras"].value:
                for h in self.frustums.values():
                    h.remove()
                self.frustums = {}
                return
            test_ids = {c.id for c in self.result.test_cameras}
            for cam in self.cameras:
                wxyz, centre, fov = camera_pose(cam)
                handle = self.server.scene.add_camera_frustum(
                    f"/cameras/{cam.id}", fov=fov, aspect=cam.width / cam.height,
                    scale=0.08 * float(self.result.scene_radius), image=self._camera_image(cam),
                    color=TEST_FRUSTUM_RGB if cam.id in test_ids else TRAIN_FRUSTUM_RGB, wxyz=wxyz, position=centre,
                    thickness=0.003 * float(self.result.scene_radius))
                handle.on_click(lambda event, cam_id=cam.id: self.view_from_camera(cam_id, event.client))
                self.frustums[cam.id] = handle

    def view_from_camera(self, cam_id: int, client=None) -> None:
        """Move one client's view (every client's when None) to camera `cam_id`'s pose and field of view."""
        cam = self.result.camera(int(cam_id))
        wxyz, centre, fov = camera_pose(cam)
        clients = [client] if client is not None else list(self.server.get_clients().values())
        for c in clients:
            with c.atomic():
                c.camera.position = centre
                c.camera.wxyz = wxyz
                c.camera.fov = fov

    # ------------------------------------------------------------------ running
    def _play_loop(self) -> None:
        while not self._stop.is_set():
            fps = max(0.5, float(self.gui["fps"].value))
            if self.gui["play"].value and self.n_frames > 1:
                start = time.perf_counter()
                self.gui["frame"].value = (self.frame + 1) % self.n_frames
                self._stop.wait(max(0.0, 1.0 / fps - (time.perf_counter() - start)))
            else:
                self._stop.wait(0.05)

    def serve_forever(self) -> None:
        """Block until close() (or Ctrl-C)."""
        while not self._stop.wait(0.5):
            pass

    def close(self) -> None:
        """Stop the player thread and the server."""
        self._stop.set()
        if getattr(self, "_player", None) is not None:
            self._player.join(timeout=5)
        self.server.stop()

    def __enter__(self) -> RunViewer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
