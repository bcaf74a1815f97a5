"""Receiving the resident base once, in chunks: resumable across runs, verified by its fingerprint, then cached.

While a base is on its way, its bytes sit in ``BASE.part`` beside the final
path, and ``BASE.part.json`` records the fingerprint and size they add up to.
A node that was interrupted reports how much it holds and the server sends
the rest; a partial download of another base is discarded. The finished file
is loaded, its fingerprint (SHA-256 over its tensors) compared with the one
the server announced, and only then moved to the final path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class ProvisioningError(ValueError):
    """A chunk does not fit the download, or the finished base is not the announced one."""


@dataclass(frozen=True)
class PartialBase:
    """The download of the base that belongs at ``path``."""

    path: Path

    @property
    def part(self) -> Path:
        return self.path.with_name(self.path.name + ".part")

    @property
    def meta(self) -> Path:
        return self.path.with_name(self.path.name + ".part.json")

    def held(self, fingerprint: str, total: int) -> int:
        """Bytes already downloaded of the base with ``fingerprint`` and size ``total`` (0 after discarding another)."""
        try:
            meta = json.loads(self.meta.read_text())
            size = self.part.stat().st_size
        except (OSError, ValueError):
            meta, size = {}, 0
        if meta.get("fingerprint") == fingerprint and meta.get("total") == total and size <= total:
            return size
        self.discard()
        return 0

    def write(self, fingerprint: str, total: int, offset: int, data: bytes) -> int:
        """Add ``data`` at ``offset``; returns the bytes now held. A chunk for another offset changes nothing."""
        held = self.held(fingerprint, total)
        if offset != held:
            return held
        if held + len(data) > total:
            raise ProvisioningError(f"chunk at {offset} of {len(data)} bytes runs past the announced {total} bytes")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if held == 0:
            self.meta.write_text(json.dumps({"fingerprint": fingerprint, "total": total}))
        with self.part.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return held + len(data)

    def finish(self, fingerprint: str, checkpoint_fingerprint: str) -> Path:
        """Move the complete download into place if its ``checkpoint_fingerprint`` is the announced one."""
        if checkpoint_fingerprint != fingerprint:
            self.discard()
            raise ProvisioningError(
                f"the received base has fingerprint {checkpoint_fingerprint[:16]}..., "
                f"not the announced {fingerprint[:16]}...: discarded"
            )
        os.replace(self.part, self.path)
        self.meta.unlink(missing_ok=True)
        return self.path

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
