"""Content-addressed artifact stores: blobs named by their sha256, written atomically, verified when read; bundles
named by their digest, checked before they are added and served from a local folder.

One interface (``Artifacts``), two implementations: ``FolderStore`` (a folder on the coordinator's disk, the
default) and ``edgeft.server.s3.S3Store`` (an S3-compatible bucket); ``edgeft.server.coordinator.open_artifacts``
picks one from the config.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from edgeft.bundle import Bundle, check_bundle, load_bundle
from edgeft.errors import BundleError


class DecodedCache:
    """Decoded blobs (tensors by name) kept by key, the least recently used dropped beyond ``max_bytes`` (the
    latest one is always kept). Global adapter versions never change once written: an asynchronous job's uploads
    are checked against the several recent versions they trained from, and its polls all ask for the latest; the
    updates it takes in are kept until a version ``take``s them."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()  # key -> (tensors, bytes)
        self._bytes = 0  # of the tensors kept
        self._lock = threading.Lock()

    def get(self, key: object) -> dict[str, np.ndarray] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: object, tensors: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._drop(key)
            self._items[key] = (tensors, sum(t.nbytes for t in tensors.values()))
            self._bytes += self._items[key][1]
            while len(self._items) > 1 and self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def take(self, key: object) -> dict[str, np.ndarray] | None:
        """The tensors kept under ``key``, no longer kept (None when none are)."""
        with self._lock:
            return self._drop(key)

    def _drop(self, key: object) -> dict[str, np.ndarray] | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self._bytes -= item[1]
        return item[0]


def check_digest(data: bytes, digest: str, where: str) -> bytes:
    """``data`` when its sha256 is ``digest`` (BundleError naming ``where`` otherwise)."""
    if hashlib.sha256(data).hexdigest() != digest:
        raise BundleError(f"artifact {digest[:12]}... in {where} is corrupt (sha256 mismatch); it is not used")
    return data


class Artifacts(ABC):
    """Where the coordinator keeps blobs (global adapters, stored updates, strategy state) and bundles.

    ``get`` verifies what it returns against its digest (BundleError when missing or corrupt); a store that cannot
    be reached raises ``edgeft.errors.Unavailable``. Bundles are always served from a local folder
    (``bundles_root``), which ``add_bundle`` and ``bundle`` keep."""

    bundles_root: Path

    @abstractmethod
    def put(self, data: bytes) -> str:
        """Store ``data``; returns its sha256. Storing the same bytes twice is a no-op."""

    @abstractmethod
    def get(self, digest: str) -> bytes:
        """The blob's bytes, checked against its name (BundleError when missing or corrupt)."""

    @abstractmethod
    def has_blobs(self) -> bool:
        """The store holds at least one blob (a coordinator's state was here)."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for logs and errors (never a secret)."""

    def check(self) -> None:
        """Raise ``Unavailable`` when the store cannot be reached now (the health check's probe)."""

    def put_tensors(self, tensors: dict[str, np.ndarray]) -> str:
        """Store named tensors (safetensors) as a blob; returns its digest."""
        return self.put(save_tensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}))

    def get_tensors(self, digest: str) -> dict[str, np.ndarray]:
        """The named tensors of a blob ``put_tensors`` stored (BundleError when missing or corrupt)."""
        return load_tensors(self.get(digest))

    def iter_tensors(self, digests: Iterable[str]) -> Iterator[dict[str, np.ndarray]]:
        """``get_tensors`` of each digest, in order, one at a time (a store may read ahead a bounded few)."""
        for digest in digests:
            yield self.get_tensors(digest)

    def remove_partial(self) -> int:
        """Delete what writes cut short left behind in the local folders (``.tmp-*``); returns how many. Only the
        store's one writer (the coordinator, at start) may call it."""
        stale = list(self.bundles_root.glob(".tmp-*"))
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return len(stale)

    def add_bundle(self, source: str | Path) -> Bundle:
        """Verify a bundle folder (files against the manifest, no symbolic links, ONNX files through
        ``check_bundle``) and keep a copy named by its digest; returns the stored bundle."""
        bundle = load_bundle(source)
        check_bundle(bundle)
        target = self.bundles_root / bundle.digest
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=self.bundles_root, prefix=".tmp-"))
            for name in ["manifest.json", *bundle.manifest.files]:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # a head-only bundle's head/ folder
                shutil.copyfile(bundle.file(name), tmp / name)
            os.replace(tmp, target)
        return self.bundle(bundle.digest)

    def bundle(self, digest: str, verify: bool = False) -> Bundle:
        """A stored bundle; ``verify``: check its files' sha256 again (a corrupt one raises BundleError)."""
        path = self.bundles_root / digest
        if not path.is_dir() or "/" in digest or digest.startswith("."):
            raise BundleError(f"no bundle with digest {digest[:12]}... on this coordinator")
        return load_bundle(path, verify=verify)


class FolderStore(Artifacts):
    """Blobs under ``root/blobs/ab/abcdef...``, bundles under ``root/bundles/<digest>/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.bundles_root = self.root / "bundles"
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.bundles_root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"the folder {self.root}"

    def _blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store ``data``; returns its sha256. Storing the same bytes twice is a no-op."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._blob_path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        return digest

    def get(self, digest: str) -> bytes:
        """The blob's bytes, checked against its name (a corrupt blob raises BundleError)."""
        path = self._blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise BundleError(f"artifact {digest[:12]}... is missing from {self.root}") from exc
        return check_digest(data, digest, str(self.root))

    def remove_partial(self) -> int:
        stale = list(self.root.glob("blobs/*/.tmp-*"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale) + super().remove_partial()

    def has_blobs(self) -> bool:
        return any(p.is_file() for d in (self.root / "blobs").iterdir() if d.is_dir() for p in d.iterdir())


ArtifactStore = FolderStore  # its name before the S3 store came (callers that open a state folder's store)
