"""A checkpoint's manifest: every file's size and CRC-32, written at save and checked before a resume.

A copy cut short, a disk returning other bytes (bit rot), a file deleted by hand: each makes a checkpoint
unusable, and without a check the first sign is a traceback deep in safetensors or torch.load, after the
intact checkpoint one interval older has been passed over. The size catches truncation at no cost; the
CRC-32 (zlib's, ~2 GB/s of CPU on one core, scripts/bench_checkpoint.py) catches changed bytes: it
detects every burst error of up to 32 bits and any other corruption with probability 1 - 2^-32. It is
not a defence against deliberate tampering (that would need a cryptographic hash at a quarter of the
speed).

manifest.json is written last, after every other file is complete, so its presence also means the
folder was written whole. Checkpoints written before manifests existed have none: they are accepted with
a note, after a check that their required files are there (their bytes cannot be checked).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Optional

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK_BYTES = 64 << 20  # read in 64 MiB pieces: large enough for full-speed CRC, small next to any host's RAM
# Files without which a checkpoint cannot be resumed (weights are checked by name in resume.weight_files);
# eval and --init-from need only the weights, which a folder without a manifest cannot vouch for anyway.
RESUME_FILES = ("train_config.json", "trainer_state.pt", "data_state.json")


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in chunks into one reused buffer."""
    crc = 0
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            crc = zlib.crc32(view[:read], crc)
    return crc


def write_manifest(directory: Path) -> None:
    """Record every file of `directory` (a checkpoint being written): name, size, CRC-32; fsync it."""
    files = {
        path.name: {"size": path.stat().st_size, "crc32": f"{file_crc32(path):08x}"}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    target = directory / MANIFEST
    with open(target, "w") as handle:
        json.dump({"format": FORMAT, "checksum": "crc32", "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def problem(directory: Path, *, required: tuple[str, ...] = (), checksums: bool = True) -> Optional[str]:
    """Why `directory` is not an intact checkpoint (one short phrase), or None if it is.

    Sizes are compared first for every file (cheap), then checksums (a full read) unless `checksums` is
    False. Without a manifest (an older checkpoint, or a folder another tool wrote), only the presence of the
    `required` files is checked."""
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        missing = [name for name in required if not (directory / name).is_file()]
        return f"{missing[0]} is missing" if missing else None
    try:
        files = json.loads(manifest_file.read_text())["files"]
        expected = {name: (int(entry["size"]), int(entry["crc32"], 16)) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    for name, (size, _) in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        found = path.stat().st_size
        if found != size:
            return f"{name} is {found:,} bytes, the manifest says {size:,} ({'cut short' if found < size else 'grown'})"
    if checksums:
        for name, (_, crc) in expected.items():
            if file_crc32(directory / name) != crc:
                return f"{name} does not match its checksum (changed bytes on disk)"
    return None


def has_manifest(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()
