"""The artifact store in an S3-compatible bucket (``[server] artifacts = "s3://bucket/prefix"``), through boto3.

Objects: ``prefix/blobs/ab/abcdef...`` (a blob named by its sha256) and ``prefix/bundles/<digest>/<file>`` (a
bundle's manifest and files). Each object is written whole by one PUT (S3 never shows a partial object) and every
read is checked against its content address: a missing or corrupt object raises BundleError and is never used.
Bundles are also kept in a local folder, from which devices download them through the coordinator (devices never
see the bucket); a bundle missing there is fetched from the bucket and verified against its manifest first.

A bucket that does not answer (refused, timed out, 5xx) raises ``edgeft.errors.Unavailable`` (gRPC UNAVAILABLE
for a device's call); nothing is written to the database for a blob that was not stored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from edgeft.bundle import Bundle, load_bundle
from edgeft.errors import BundleError, ConfigError, Unavailable
from edgeft.server.artifacts import Artifacts, check_digest
from edgeft.server.config import S3Settings

log = logging.getLogger("edgeft.server")
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
READ_AHEAD = 8  # GETs in flight while aggregation streams the stored updates (iter_tensors)
# HTTP connections kept to the store: the server's event loop, its clock and health threads, and the read-ahead GETs;
# beyond the pool urllib3 opens and drops a connection for each request
POOL_CONNECTIONS = 8 + READ_AHEAD
UNREACHABLE = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


def parse_location(location: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` as (bucket, prefix with a trailing slash or empty)."""
    if not location.startswith("s3://"):
        raise ConfigError(f'invalid server.artifacts: {location!r}; must be "s3://bucket/prefix"')
    bucket, _, prefix = location[5:].partition("/")
    if not bucket:
        raise ConfigError(f'invalid server.artifacts: {location!r} names no bucket; must be "s3://bucket/prefix"')
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Store(Artifacts):
    """Blobs and bundles in ``s3://bucket/prefix``; bundles also in the local folder ``cache``."""

    def __init__(self, location: str, settings: S3Settings, cache: str | Path):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_location(location)
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
            aws_access_key_id=settings.access_key_id, aws_secret_access_key=settings.secret_access_key,
            config=Config(connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
                          retries={"max_attempts": 2, "mode": "standard"},
                          # no sha256 of each body for the signature (botocore's default without TLS or a checksum):
                          # every object is named by its sha256 already and checked against it on every read
                          s3={"addressing_style": "path", "payload_signing_enabled": False},
                          max_pool_connections=POOL_CONNECTIONS,
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))
        self.endpoint = self.client.meta.endpoint_url
        self.last_error = ""  # what the store's last failed request said (logged; never sent to devices)
        self.bundles_root = Path(cache)
        self.bundles_root.mkdir(parents=True, exist_ok=True)
        self.check(starting=True)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"

    # -- errors -------------------------------------------------------------------------------------
    def _call(self, what: str, fn, **kwargs):  # noqa: ANN001, ANN202
        """``fn(**kwargs)`` with botocore's errors as edgeft's: Unavailable when the store does not answer,
        KeyError for a missing object (the caller says what is missing), BundleError for any other refusal."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result = fn(**kwargs)
            if self.last_error:
                log.warning("the artifact store %s answers again", self.describe())
                self.last_error = ""
            return result
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in NOT_FOUND or status == "404":
                raise KeyError(kwargs.get("Key", self.bucket)) from exc
            if code in UNREACHABLE or status.startswith("5"):
                raise self._unavailable(what, code) from exc
            raise BundleError(f"the artifact store {self.describe()} refused {what}: {code} "
                              f"({exc.response.get('Error', {}).get('Message', '')})") from exc
        except BotoCoreError as exc:  # connection refused or reset, timeouts, no credentials
            from botocore.exceptions import NoCredentialsError

            if isinstance(exc, NoCredentialsError):
                raise ConfigError(f"no credentials for the artifact store {self.describe()}: set [server.s3] "
                                  "access_key_id and secret_access_key, or AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY") from exc
            raise self._unavailable(what, exc) from exc

    def _unavailable(self, what: str, cause: object) -> Unavailable:
        """The store did not answer: the details go to the log (devices never see where the store is)."""
        if not self.last_error:  # once per outage, not on every call
            log.warning("the artifact store %s: %s failed: %s", self.describe(), what, cause)
        self.last_error = f"{self.describe()}: {what} failed: {cause}"
        return Unavailable("the coordinator's artifact store is unavailable; retry later")

    def check(self, starting: bool = False) -> None:
        """The bucket answers (HEAD bucket); at start the error also says what to do."""
        try:
            self._call("HEAD bucket", self.client.head_bucket, Bucket=self.bucket)
        except KeyError as exc:
            raise ConfigError(f"the bucket {self.bucket!r} does not exist at {self.endpoint}: create it, or fix "
                              "[server] artifacts") from exc
        except Unavailable as exc:
            if not starting:
                raise
            raise Unavailable(f"cannot reach the coordinator's artifact store ({self.last_error}). Start the "
                              "object store, or fix [server] artifacts and [server.s3] endpoint_url (or "
                              "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), then start the coordinator again") from exc

    # -- blobs --------------------------------------------------------------------------------------
    def _blob_key(self, digest: str) -> str:
        return f"{self.prefix}blobs/{digest[:2]}/{digest}"

    def put(self, data: bytes) -> str:
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        self._call("PUT blob", self.client.put_object, Bucket=self.bucket, Key=self._blob_key(digest), Body=data)
        return digest

    def _read(self, key: str) -> bytes:
        response = self._call("GET object", self.client.get_object, Bucket=self.bucket, Key=key)
        try:
            return response["Body"].read()
        except Exception as exc:  # noqa: BLE001 - a connection lost mid-body: the store went away
            raise self._unavailable(f"reading {key}", exc) from exc

    def get(self, digest: str) -> bytes:
        try:
            data = self._read(self._blob_key(digest))
        except KeyError as exc:
            raise BundleError(f"artifact {digest[:12]}... is missing from {self.describe()}") from exc
        return check_digest(data, digest, self.describe())

    def iter_tensors(self, digests: Iterable[str]) -> Iterator[dict[str, np.ndarray]]:
        """``get_tensors`` of each digest in order, READ_AHEAD GETs in flight at once (each object checked against
        its digest as ``get`` does): aggregation waits for the bucket once per READ_AHEAD objects, not per object,
        and holds at most 2 x READ_AHEAD of them. The first error is raised where its object comes in order."""
        digests = iter(digests)
        with ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="edgeft-s3-get") as pool:
            pending = deque(pool.submit(self.get_tensors, d) for d in islice(digests, 2 * READ_AHEAD))
            try:
                while pending:
                    tensors = pending.popleft().result()
                    following = next(digests, None)
                    if following is not None:
                        pending.append(pool.submit(self.get_tensors, following))
                    yield tensors
            finally:  # an error or a consumer that stopped early: nothing more is fetched
                for future in pending:
                    future.cancel()

    def has_blobs(self) -> bool:
        listed = self._call("LIST blobs", self.client.list_objects_v2, Bucket=self.bucket,
                            Prefix=f"{self.prefix}blobs/", MaxKeys=1)
        return listed.get("KeyCount", 0) > 0

    # -- bundles ------------------------------------------------------------------------------------
    def add_bundle(self, source: str | Path) -> Bundle:
        """Verify a bundle, keep it in the local folder and in the bucket (manifest last: a bundle whose
        manifest is in the bucket is whole there)."""
        bundle = super().add_bundle(source)
        head = f"{self.prefix}bundles/{bundle.digest}/"
        try:
            self._call("HEAD bundle", self.client.head_object, Bucket=self.bucket, Key=head + "manifest.json")
            return bundle
        except KeyError:
            pass
        for name in [*bundle.manifest.files, "manifest.json"]:
            with open(bundle.file(name), "rb") as fh:
                self._call("PUT bundle file", self.client.put_object, Bucket=self.bucket, Key=head + name, Body=fh)
        return bundle

    def bundle(self, digest: str, verify: bool = False) -> Bundle:
        """A bundle from the local folder; one missing there is fetched from the bucket and verified first."""
        if "/" in digest or digest.startswith(".") or not digest:
            raise BundleError(f"no bundle with digest {digest[:12]}... on this coordinator")
        if not (self.bundles_root / digest).is_dir():
            self._fetch_bundle(digest)
        return super().bundle(digest, verify=verify)

    def _fetch_bundle(self, digest: str) -> None:
        head = f"{self.prefix}bundles/{digest}/"
        try:
            manifest = self._read(head + "manifest.json")
        except KeyError as exc:
            raise BundleError(f"no bundle with digest {digest[:12]}... in {self.describe()}") from exc
        check_digest(manifest, digest, self.describe())  # the manifest pins every file's sha256
        tmp = Path(tempfile.mkdtemp(dir=self.bundles_root, prefix=".tmp-"))
        try:
            (tmp / "manifest.json").write_bytes(manifest)
            try:
                names = list(json.loads(manifest)["files"])
            except (ValueError, KeyError, TypeError) as exc:
                raise BundleError(f"bundle {digest[:12]}... in {self.describe()} has a corrupt manifest") from exc
            for name in names:
                target = tmp / name
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise BundleError(f"bundle {digest[:12]}... in {self.describe()} names a file outside it")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    target.write_bytes(self._read(head + name))
                except KeyError as exc:
                    raise BundleError(f"bundle {digest[:12]}... in {self.describe()} lacks {name}") from exc
            load_bundle(tmp, verify=True)  # every file against the manifest's sha256 (BundleError otherwise)
            try:
                os.replace(tmp, self.bundles_root / digest)
            except OSError:
                if not (self.bundles_root / digest).is_dir():  # else another thread fetched it first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
