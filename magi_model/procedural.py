"""Procedural training videos for the tiny MAGI-1 demo model: one object on a plain background,
with one caption per 24-frame chunk from a small grammar.

A clip is ``num_chunks`` chunks of ``frames_per_chunk`` frames. The object (a circle or a square, small
or big, one of five colours) moves in a straight line at a constant speed inside each chunk; at a
chunk boundary it keeps its direction or turns (it must turn -- "bounces" -- when going on would
take it past the frame's edge). Each chunk's caption says what that chunk shows::

    "a big red circle moves left quickly on a dark blue background"

so a clip with a turn is also a chunk-wise-prompt example ("moves right", then "moves left").
Everything is drawn from a seeded ``numpy`` generator: no downloads, same clips on every machine.

The rendering is anti-aliased (coverage of each pixel by the shape, from a 4x4 sub-pixel grid), so
sub-pixel motion is smooth and the centroid of the object is a precise motion signal.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np

# Names -> RGB (uint8). Object colours are chosen to stay distinguishable on every background.
OBJECT_COLOURS = {
    "red": (225, 40, 40), "green": (40, 205, 70), "blue": (70, 110, 255), "yellow": (245, 225, 40),
    "white": (245, 245, 245),
}
BACKGROUNDS = {"black": (12, 12, 12), "gray": (105, 105, 105), "dark blue": (20, 28, 95), "dark green": (20, 75, 35)}
SHAPES = ("circle", "square")
SIZES = {"small": 3.5, "big": 5.5}  # radius / half side in px at 32 px frames (scaled with the frame size)
SPEEDS = {"slowly": 0.3, "quickly": 0.5}  # px per frame at 32 px frames (scaled with the frame size)
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
REFERENCE_SIZE = 32  # px: the sizes and speeds above are for this frame size

CAPTION_TEMPLATE = "a {size} {colour} {shape} moves {direction} {speed} on a {background} background"
_WORD = re.compile(r"[a-z]+")


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (the tiny text encoder's vocabulary)."""
    words: set[str] = set()
    for group in (SIZES, OBJECT_COLOURS, SHAPES, DIRECTIONS, SPEEDS, BACKGROUNDS):
        for phrase in group:
            words.update(phrase.split())
    words.update(_WORD.findall(re.sub(r"\{\w+\}", " ", CAPTION_TEMPLATE)))  # the template's fixed words
    return sorted(words)


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """What stays fixed over a clip."""

    colour: str
    shape: str
    size: str
    speed: str
    background: str


@dataclasses.dataclass
class Clip:
    """``frames`` uint8 (T, H, W, 3); one caption, direction and centroid track per chunk / frame."""

    frames: np.ndarray
    captions: list[str]
    directions: list[str]
    spec: ObjectSpec
    centres: np.ndarray  # (T, 2) float (x, y) in px, the true centre of the object in every frame


def caption(spec: ObjectSpec, direction: str) -> str:
    return CAPTION_TEMPLATE.format(size=spec.size, colour=spec.colour, shape=spec.shape, direction=direction,
                                   speed=spec.speed, background=spec.background)


def render_frame(spec: ObjectSpec, centre: Sequence[float], size_px: int) -> np.ndarray:
    """uint8 (H, W, 3): the object centred at ``centre`` (x, y in px), anti-aliased."""
    scale = size_px / REFERENCE_SIZE
    r = SIZES[spec.size] * scale
    sub = (np.arange(4) + 0.5) / 4  # 4x4 sub-pixel samples per pixel
    coords = (np.arange(size_px)[:, None] + sub[None]).reshape(-1)  # (size_px * 4,)
    dx = coords[None, :] - centre[0]
    dy = coords[:, None] - centre[1]
    inside = (dx ** 2 + dy ** 2 <= r ** 2) if spec.shape == "circle" else ((np.abs(dx) <= r) & (np.abs(dy) <= r))
    cover = inside.reshape(size_px, 4, size_px, 4).mean(axis=(1, 3))[..., None]
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    fg = np.array(OBJECT_COLOURS[spec.colour], dtype=np.float64)
    return np.clip(np.rint(bg * (1 - cover) + fg * cover), 0, 255).astype(np.uint8)


def _fits(pos: np.ndarray, direction: str, distance: float, margin: float, size_px: int) -> bool:
    end = pos + np.array(DIRECTIONS[direction]) * distance
    return bool(np.all(end >= margin) and np.all(end <= size_px - margin))


def make_clip(rng: np.random.Generator, *, num_chunks: int = 2, frames_per_chunk: int = 24, size_px: int = 32,
              turn_probability: float = 0.3, spec: Optional[ObjectSpec] = None,
              directions: Optional[Sequence[str]] = None) -> Clip:
    """One random clip. ``spec`` / ``directions`` (one per chunk) fix those choices (tests, demos); a
    direction that would leave the frame is refused."""
    if num_chunks < 1 or frames_per_chunk < 1:
        raise ValueError(f"make_clip: num_chunks and frames_per_chunk must be >= 1, got {num_chunks}, "
                         f"{frames_per_chunk}")
    if directions is not None and len(directions) != num_chunks:
        raise ValueError(f"make_clip: argument 'directions' needs one entry per chunk ({num_chunks}), "
                         f"got {len(directions)}")
    if spec is None:
        spec = ObjectSpec(colour=str(rng.choice(list(OBJECT_COLOURS))), shape=str(rng.choice(SHAPES)),
                          size=str(rng.choice(list(SIZES))), speed=str(rng.choice(list(SPEEDS))),
                          background=str(rng.choice(list(BACKGROUNDS))))
    scale = size_px / REFERENCE_SIZE
    margin = SIZES[spec.size] * scale + 1.0
    step = SPEEDS[spec.speed] * scale
    run = step * frames_per_chunk  # distance covered in one chunk

    # Start somewhere the first chunk's motion fits.
    first = directions[0] if directions is not None else str(rng.choice(list(DIRECTIONS)))
    lo, hi = margin, size_px - margin
    pos = rng.uniform(lo, hi, size=2)
    d = np.array(DIRECTIONS[first])
    for axis in range(2):  # leave room ahead along the motion axis
        if d[axis] > 0:
            pos[axis] = rng.uniform(lo, max(lo, hi - run))
        elif d[axis] < 0:
            pos[axis] = rng.uniform(min(hi, lo + run), hi)

    chosen: list[str] = []
    centres, frames = [], []
    current = first
    for c in range(num_chunks):
        if c > 0:
            if directions is not None:
                current = directions[c]
            else:
                keep_ok = _fits(pos, current, run, margin, size_px)
                if not keep_ok or rng.random() < turn_probability:
                    options = [o for o in DIRECTIONS if o != current and _fits(pos, o, run, margin, size_px)]
                    # A reversal is the most common turn (a bounce); any direction that fits otherwise.
                    if OPPOSITE[current] in options and rng.random() < 0.6:
                        current = OPPOSITE[current]
                    elif options:
                        current = str(rng.choice(options))
        if not _fits(pos, current, run, margin, size_px):
            raise ValueError(f"make_clip: direction {current!r} for chunk {c} takes the object out of the frame")
        chosen.append(current)
        v = np.array(DIRECTIONS[current]) * step
        for _ in range(frames_per_chunk):
            centres.append(pos.copy())
            frames.append(render_frame(spec, pos, size_px))
            pos = pos + v
    return Clip(np.stack(frames), [caption(spec, d) for d in chosen], chosen, spec, np.stack(centres))


# --------------------------------------------------------------------------------------------------
# A detector for generated frames (the evaluation of the trained model)


@dataclasses.dataclass
class Detection:
    colour: Optional[str]  # nearest object colour of the detected pixels (None: nothing found)
    centroids: np.ndarray  # (T, 2) (x, y) px per frame, NaN where nothing was found
    mean_rgb: np.ndarray


def detect(frames: np.ndarray, background: Optional[str] = None, *, threshold: float = 60.0) -> Detection:
    """Find the object in uint8 frames (T, H, W, 3): pixels farther than ``threshold`` (RGB distance)
    from the background colour (named, or else the median colour of the frame border) form the object;
    its colour is the nearest :data:`OBJECT_COLOURS` entry to their mean, its track the per-frame
    centroid (weighted by distance from the background)."""
    f = frames.astype(np.float64)
    T, H, W, _ = f.shape
    if background is not None:
        bg = np.broadcast_to(np.array(BACKGROUNDS[background], dtype=np.float64), (T, 3))
    else:
        border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)  # (T, 2H+2W, 3)
        bg = np.median(border, axis=1)
    dist = np.linalg.norm(f - bg[:, None, None], axis=-1)  # (T, H, W)
    weight = np.where(dist > threshold, dist, 0.0)
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    mass = weight.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (weight * xs).sum(axis=(1, 2)) / mass
        cy = (weight * ys).sum(axis=(1, 2)) / mass
    cent = np.stack([cx, cy], axis=1)
    cent[mass == 0] = np.nan
    sel = dist > threshold
    if not sel.any():
        return Detection(None, cent, np.full(3, np.nan))
    mean = f[sel].mean(axis=0)
    names = list(OBJECT_COLOURS)
    d = [np.linalg.norm(mean - np.array(OBJECT_COLOURS[n])) for n in names]
    return Detection(names[int(np.argmin(d))], cent, mean)


def motion_direction(centroids: np.ndarray, *, min_px: float = 2.0) -> Optional[str]:
    """The dominant direction of a centroid track (first vs last quarter of the valid frames); None
    when it moved less than ``min_px``."""
    ok = np.isfinite(centroids).all(axis=1)
    track = centroids[ok]
    if len(track) < 4:
        return None
    q = max(1, len(track) // 4)
    delta = track[-q:].mean(axis=0) - track[:q].mean(axis=0)
    if np.abs(delta).max() < min_px:
        return None
    if abs(delta[0]) >= abs(delta[1]):
        return "right" if delta[0] > 0 else "left"
    return "down" if delta[1] > 0 else "up"


__all__ = ["OBJECT_COLOURS", "BACKGROUNDS", "SHAPES", "SIZES", "SPEEDS", "DIRECTIONS", "ObjectSpec", "Clip",
           "vocabulary", "caption", "render_frame", "make_clip", "Detection", "detect", "motion_direction"]
