"""Training text: byte-level tokens (vocab 256) of the Python standard library's own .py source files.

Real text that no one here wrote, present on every machine with Python. The stdlib directory is walked in a
fixed order (sorted relative paths); test suites (test/, tests/, idle_test/) and installed packages
(site-packages/, dist-packages/) are left out, since some Python builds strip the former and the latter differ
per machine. Files are joined with a NUL byte (which no source file contains) as an end-of-file marker.
Validation is split by file: a file is held out when sha256(relative path) mod 100 < VAL_PERCENT, so the
split of a file never depends on which other files exist (Python versions differ in their file lists).
`info` fingerprints what was read (Python version, file and byte counts, sha256 of the token streams): runs
on two machines are only comparable when their fingerprints match.

Batches are pure functions of (seed, step): a resumed run reads exactly the batches the first run would have.
Legend: B batch, S sequence length, N tokens in a split.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
VAL_PERCENT = 5
EOF_BYTE = b"\x00"


@dataclass
class Corpus:
    train_N: torch.Tensor   # uint8 tokens
    val_N: torch.Tensor
    info: dict


def stdlib_files(root: Path) -> list[str]:
    """Relative paths of the stdlib's .py files in a fixed (sorted) order, excluded directories skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel = Path(dirpath).relative_to(root)
        out += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(out)


def is_val(rel_path: str) -> bool:
    return int(hashlib.sha256(rel_path.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


@functools.cache
def load(root: str | None = None) -> Corpus:
    root_p = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root_p)
    if not files:
        raise FileNotFoundError(f"no .py files under the Python stdlib directory {root_p}")
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for f in files:
        parts[is_val(f)].append((root_p / f).read_bytes().replace(EOF_BYTE, b"") + EOF_BYTE)
    streams = {k: b"".join(v) for k, v in parts.items()}
    info = {"source": "python-stdlib .py files, bytes", "root": str(root_p), "python": sys.version.split()[0],
            "files_train": len(parts[False]), "files_val": len(parts[True]),
            "tokens_train": len(streams[False]), "tokens_val": len(streams[True]),
            "sha256_train": hashlib.sha256(streams[False]).hexdigest()[:16],
            "sha256_val": hashlib.sha256(streams[True]).hexdigest()[:16]}
    return Corpus(_tensor(streams[False]), _tensor(streams[True]), info)


def _tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def train_batch(tokens_N: torch.Tensor, B: int, S: int, seed: int, step: int) -> torch.Tensor:
    """ids_BS (long, on tokens_N's device): B windows of S tokens at offsets drawn from a generator seeded
    by (seed, step) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    off_B = torch.randint(0, tokens_N.numel() - S + 1, (B,), generator=g).to(tokens_N.device)
    return tokens_N[off_B.unsqueeze(1) + torch.arange(S, device=tokens_N.device)].long()


def val_batches(tokens_N: torch.Tensor, B: int, S: int, n: int) -> list[torch.Tensor]:
    """n fixed batches of B windows each, evenly spaced over the validation stream."""
    if tokens_N.numel() < S:
        raise ValueError(f"validation split has {tokens_N.numel()} tokens, fewer than seq {S}")
    off = torch.linspace(0, tokens_N.numel() - S, n * B, dtype=torch.float64).long().to(tokens_N.device)
    ids = tokens_N[off.unsqueeze(1) + torch.arange(S, device=tokens_N.device)].long()
    return list(ids.view(n, B, S))
