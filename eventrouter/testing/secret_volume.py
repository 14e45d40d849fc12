"""A folder laid out and updated as the kubelet does for a Secret or ConfigMap volume.

The kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go) writes each version of the payload
into a new hidden folder ``..<timestamp>``, points the symlink ``..data`` at it by renaming a new
symlink over the old one (the one atomic step), and gives every key a visible symlink
``<key> -> ..data/<key>``; then it removes the old version. A reader therefore sees either the old
or the new payload of every key, never a mix or a half-written file, and the inode behind
``<key>`` changes on every update. Keys that left the payload lose their symlink.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["SecretVolume"]

DATA = "..data"


class SecretVolume:
    """``SecretVolume(path, {"token": "abc"})``; ``update({...})`` publishes a new payload."""

    def __init__(self, path: Path, payload: Mapping[str, str | bytes], *, mode: int = 0o644) -> None:
        self.path = path
        self.mode = mode
        path.mkdir(parents=True, exist_ok=True)
        self.updates = 0
        self.update(payload)

    def file(self, key: str) -> Path:
        """The path a pod reads ``key`` at (``file:`` references name this)."""
        return self.path / key

    def update(self, payload: Mapping[str, str | bytes]) -> None:
        old_target = os.readlink(self.path / DATA) if (self.path / DATA).is_symlink() else None
        old_keys = set(os.listdir(self.path / DATA)) if old_target else set()
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S.", time.gmtime())
        version = Path(tempfile.mkdtemp(prefix=".." + stamp, dir=self.path))
        for key, value in payload.items():
            data = value.encode() if isinstance(value, str) else value
            target = version / key
            target.write_bytes(data)
            target.chmod(self.mode)
        version.chmod(0o755)
        tmp_link = self.path / "..data_tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(version.name)
        os.rename(tmp_link, self.path / DATA)  # the atomic swap
        for key in payload:
            link = self.path / key
            if not link.is_symlink():
                link.symlink_to(f"{DATA}/{key}")
        for key in old_keys - set(payload):
            (self.path / key).unlink(missing_ok=True)
        if old_target is not None:
            shutil.rmtree(self.path / old_target, ignore_errors=True)
        self.updates += 1
