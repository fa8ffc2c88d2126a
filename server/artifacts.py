"""A content-addressed artifact store on disk: blobs named by their sha256, written atomically,
verified when read; bundles stored as folders named by their digest, checked before they are added."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from edgeft.bundle import Bundle, check_bundle, load_bundle
from edgeft.errors import BundleError


class ArtifactStore:
    """Blobs under ``root/blobs/ab/abcdef...``, bundles under ``root/bundles/<digest>/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "bundles").mkdir(parents=True, exist_ok=True)

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
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"artifact {digest[:12]}... in {self.root} is corrupt (sha256 mismatch)")
        return data

    def put_tensors(self, tensors: dict[str, np.ndarray]) -> str:
        """Store named tensors (safetensors) as a blob; returns its digest."""
        return self.put(save_tensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}))

    def get_tensors(self, digest: str) -> dict[str, np.ndarray]:
        """The named tensors of a blob ``put_tensors`` stored (BundleError when missing or corrupt)."""
        return load_tensors(self.get(digest))

    def remove_partial(self) -> int:
        """Delete what writes cut short left behind (``.tmp-*`` files and folders); returns how many. Only the
        store's one writer (the coordinator, at start) may call it."""
        stale = [*self.root.glob("blobs/*/.tmp-*"), *self.root.glob("bundles/.tmp-*")]
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return len(stale)

    def has_blobs(self) -> bool:
        return any(p.is_file() for d in (self.root / "blobs").iterdir() if d.is_dir() for p in d.iterdir())

    def add_bundle(self, source: str | Path) -> Bundle:
        """Verify a bundle folder (files against the manifest, no symbolic links, ONNX files through
        ``check_bundle``) and keep a copy named by its digest; returns the stored bundle."""
        bundle = load_bundle(source)
        check_bundle(bundle)
        target = self.root / "bundles" / bundle.digest
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=self.root / "bundles", prefix=".tmp-"))
            for name in ["manifest.json", *bundle.manifest.files]:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # a head-only bundle's head/ folder
                shutil.copyfile(bundle.file(name), tmp / name)
            os.replace(tmp, target)
        return self.bundle(bundle.digest)

    def bundle(self, digest: str, verify: bool = False) -> Bundle:
        """A stored bundle; ``verify``: check its files' sha256 again (a corrupt one raises BundleError)."""
        path = self.root / "bundles" / digest
        if not path.is_dir() or "/" in digest or digest.startswith("."):
            raise BundleError(f"no bundle with digest {digest[:12]}... on this coordinator")
        return load_bundle(path, verify=verify)
