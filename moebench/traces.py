"""Routing traces: the top-k expert choices a real model made, recorded once (`moebench trace`,
moebench/record.py) and replayed as a workload's routing (`routing = "trace:<path>"`, moebench/routing.py
fixed_idx).

Legend: L recorded MoE layers (model order), T recorded tokens, K top-k, E experts.

File format: a numpy .npz archive (np.savez_compressed) with
  idx_LTK  int16 (int32 when E > 32767): the K experts each token picked, per MoE layer, in the router's order
  p_LTK    float32, optional: the gate weights the router returned with them (absent when it returned logits)
  meta     a JSON string: {"format": "moebench-trace", "version": 1, "model": the model's path or name,
           "model_type", "n_experts": E, "top_k": K, "layers": [the router modules' names], "tokens": T,
           "seq": tokens per forward pass, "text": the text file's name, "text_sha256", "weights": bool,
           "moebench": version}
Replay (sample): a workload of T' tokens gets T' consecutive recorded tokens starting at an offset drawn from
  the seed, wrapping around the end (so tiled when T' > T): rows (off + arange(T')) % T. Same seed, same rows.
  Layer l of a model replays recorded layer l % L. Gate weights are in the file; the harness takes the choices
  only (gate weights still come from the router's scores at the chosen experts, so gradients reach it, as for
  synthetic routing).
Paths: a relative trace path is relative to paths.ROOT (the directory holding suites/), never to the working
  directory, so worker processes and other checkouts resolve it alike. A suite file names its traces relative
  to itself; suite.py stores them with stored_path (ROOT-relative under ROOT, absolute elsewhere).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from moebench.paths import ROOT

FORMAT, VERSION = "moebench-trace", 1


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class Trace:
    idx_LTK: np.ndarray
    p_LTK: np.ndarray | None
    meta: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.idx_LTK.shape)

    @property
    def n_experts(self) -> int:
        return int(self.meta["n_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])


def resolve(stored: str | Path) -> Path:
    """The file a stored trace path names: absolute as given, relative to ROOT otherwise."""
    p = Path(stored).expanduser()
    return p if p.is_absolute() else ROOT / p


def stored_path(path: Path) -> str:
    """How a case stores a trace path: relative to ROOT (posix) when the file lies under it, else absolute."""
    p = Path(path).expanduser().resolve()
    try:
        return p.relative_to(ROOT.resolve()).as_posix()
    except ValueError:
        return str(p)


def save(path: Path, idx_LTK: np.ndarray, p_LTK: np.ndarray | None, meta: dict) -> Path:
    """Write a trace (the module docstring's format). meta must give n_experts and top_k; the rest is
    copied."""
    idx_LTK = np.asarray(idx_LTK)
    if idx_LTK.ndim != 3 or 0 in idx_LTK.shape:
        raise TraceError(f"{path}: idx_LTK must be a non-empty (layers, tokens, top_k) array, got "
                         f"{idx_LTK.shape}")
    E, K = int(meta["n_experts"]), int(meta["top_k"])
    _check_idx(path, idx_LTK, E, K)
    L, T, _ = idx_LTK.shape
    arrays = {"idx_LTK": idx_LTK.astype(np.int16 if E <= np.iinfo(np.int16).max else np.int32)}
    if p_LTK is not None:
        if np.shape(p_LTK) != idx_LTK.shape:
            raise TraceError(f"{path}: p_LTK has shape {np.shape(p_LTK)}, idx_LTK {idx_LTK.shape}")
        arrays["p_LTK"] = np.asarray(p_LTK, dtype=np.float32)
    full = {"format": FORMAT, "version": VERSION, **meta, "tokens": T, "weights": p_LTK is not None}
    if len(full.get("layers", [None] * L)) != L:
        raise TraceError(f"{path}: meta names {len(full['layers'])} layers, idx_LTK has {L}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name without it
        np.savez_compressed(f, meta=np.array(json.dumps(full, sort_keys=True)), **arrays)
    return path


def _check_idx(path, idx_LTK: np.ndarray, E: int, K: int) -> None:
    if idx_LTK.shape[-1] != K:
        raise TraceError(f"{path}: idx_LTK has {idx_LTK.shape[-1]} choices per token, meta says top_k {K}")
    if idx_LTK.min() < 0 or idx_LTK.max() >= E:
        raise TraceError(f"{path}: expert ids span {idx_LTK.min()}..{idx_LTK.max()}, outside 0..{E - 1} "
                         f"(n_experts {E})")
    if K > 1 and (np.diff(np.sort(idx_LTK, axis=-1), axis=-1) == 0).any():  # top-k picks K distinct experts;
        # every backend assumes it (ep-padded's blocks hold T*min(K, E/R) rows)
        raise TraceError(f"{path}: a token picks the same expert twice (top-k choices must be distinct)")


def _open(stored: str):
    path = resolve(stored)
    if not path.is_file():
        raise TraceError(f"trace file {path} does not exist" + ("" if Path(stored).is_absolute() else
                         f" (a relative trace path is relative to {ROOT})"))
    try:
        return path, np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise TraceError(f"{path}: not a moebench trace (.npz): {e}") from None


def _meta(path: Path, z) -> dict:
    if "meta" not in z.files or "idx_LTK" not in z.files:
        raise TraceError(f"{path}: not a moebench trace: it needs arrays meta and idx_LTK, has "
                         f"{sorted(z.files)}")
    try:
        meta = json.loads(str(z["meta"]))
    except (ValueError, TypeError) as e:
        raise TraceError(f"{path}: meta is not JSON: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TraceError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                         f"moebench reads {FORMAT!r} version {VERSION}")
    for k in ("n_experts", "top_k"):
        if not isinstance(meta.get(k), int) or meta[k] < 1:
            raise TraceError(f"{path}: meta.{k} must be a positive integer, got {meta.get(k)!r}")
    return meta


def header(stored: str) -> dict:
    """The trace's meta alone (the arrays are not read)."""
    path, z = _open(stored)
    with z:
        return _meta(path, z)


def check(stored: str, n_experts: int, top_k: int, model: str = "the model") -> None:
    """A trace replays only on a model with its E and K: TraceError naming the file and both otherwise."""
    try:
        meta = header(stored)
    except TraceError as e:
        raise TraceError(f"routing trace:{stored}: {e}") from None
    if (meta["n_experts"], meta["top_k"]) != (n_experts, top_k):
        raise TraceError(f"routing trace:{stored}: {resolve(stored)} was recorded with "
                         f"E={meta['n_experts']}, K={meta['top_k']} (from {meta.get('model', '?')}); model "
                         f"'{model}' has E={n_experts}, K={top_k}")


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> Trace:  # keyed on the file's state: a rewrite is re-read
    path, z = _open(path)
    with z:
        meta = _meta(path, z)
        idx_LTK = z["idx_LTK"]
        p_LTK = z["p_LTK"] if "p_LTK" in z.files else None
    if idx_LTK.ndim != 3 or 0 in idx_LTK.shape:
        raise TraceError(f"{path}: idx_LTK must be a non-empty (layers, tokens, top_k) array, got "
                         f"{idx_LTK.shape}")
    _check_idx(path, idx_LTK, meta["n_experts"], meta["top_k"])
    if p_LTK is not None and p_LTK.shape != idx_LTK.shape:
        raise TraceError(f"{path}: p_LTK has shape {p_LTK.shape}, idx_LTK {idx_LTK.shape}")
    return Trace(idx_LTK, p_LTK, meta)


def load(stored: str) -> Trace:
    path = resolve(stored)
    st = path.stat() if path.is_file() else None
    return _load(str(path), st.st_mtime_ns if st else 0, st.st_size if st else 0)


def sample(trace: Trace, T: int, seed: int, layer: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(idx_TK, p_TK or None) for T tokens: consecutive recorded tokens from a seeded offset, wrapping around;
    layer l replays recorded layer l % L."""
    L, Tr, _ = trace.shape
    off = int(np.random.default_rng(seed % 2**63).integers(Tr))
    rows_T = (off + np.arange(T)) % Tr
    idx_TK = trace.idx_LTK[layer % L][rows_T].astype(np.int64)
    p_TK = None if trace.p_LTK is None else trace.p_LTK[layer % L][rows_T]
    return idx_TK, p_TK
