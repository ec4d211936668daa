"""`s3://bucket/prefix` through the minio client, against MinIO or any S3-compatible store.

The prefix is a folder (every object under `prefix/`) or one object (a .gguf). Each object's size
is checked, and its MD5 where the ETag is one: a single-part upload without SSE-KMS/SSE-C.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from urllib.parse import urlparse

from app.hub.sources.files import CHUNK_SIZE, Listing, SourceFile
from app.hub.sources.spec import SourceSpec
from app.jobs.context import JobError, TransientJobError
from app.settings import S3Settings

_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")
# Codes that a later attempt may not see again; everything else is the user's to fix.
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted"}
_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


def make_client(settings: S3Settings):
    """A Minio client for `settings`; the endpoint may be `host:port` or a URL."""
    import urllib3
    from minio import Minio

    endpoint, secure = settings.endpoint or "s3.amazonaws.com", True
    if "://" in endpoint:
        url = urlparse(endpoint)
        endpoint, secure = url.netloc, url.scheme == "https"
    if settings.secure is not None:
        secure = settings.secure
    # Few, short retries here: the job runner retries a TransientJobError with its own backoff.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=60),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    return Minio(endpoint, access_key=settings.access_key, secret_key=settings.secret_key,
                 secure=secure, region=settings.region, http_client=http)  # fmt: skip


@contextlib.contextmanager
def s3_errors(what: str, settings: S3Settings) -> Iterator[None]:
    """Turn minio/urllib3 failures into JobError (fix the input) or TransientJobError (retry)."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    endpoint = settings.endpoint or "s3.amazonaws.com"
    try:
        yield
    except S3Error as exc:
        status = getattr(exc.response, "status", 0) or 0
        if exc.code in _TRANSIENT_CODES or status >= 500:
            raise TransientJobError(f"{what}: S3 at {endpoint} answered {exc.code} ({status}); will retry") from exc
        if exc.code == "NoSuchBucket":
            raise JobError(f"{what}: bucket {exc.bucket_name!r} does not exist at {endpoint}; check the bucket name") from exc
        if exc.code in _CREDENTIAL_CODES:
            raise JobError(
                f"{what}: S3 at {endpoint} refused the credentials ({exc.code}); set MXEXT_S3_ACCESS_KEY and "
                "MXEXT_S3_SECRET_KEY (or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) for this bucket"
            ) from exc
        raise JobError(f"{what}: S3 at {endpoint} answered {exc.code}: {exc.message}") from exc
    except ServerError as exc:
        if exc.status_code >= 500:
            raise TransientJobError(f"{what}: S3 at {endpoint} answered HTTP {exc.status_code}; will retry") from exc
        raise JobError(f"{what}: S3 at {endpoint} answered HTTP {exc.status_code}: {exc}") from exc
    except (InvalidResponseError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
        raise TransientJobError(
            f"{what}: could not reach S3 at {endpoint} ({type(exc).__name__}); will retry. "
            "If this persists, check MXEXT_S3_ENDPOINT and MXEXT_S3_SECURE"
        ) from exc


def s3_listing(spec: SourceSpec, settings: S3Settings) -> Listing:
    client = make_client(settings)
    bucket, prefix = spec.bucket, spec.prefix
    with s3_errors(f"listing {spec}", settings):
        if not client.bucket_exists(bucket):
            raise JobError(f"source {spec}: bucket {bucket!r} does not exist at {settings.endpoint or 's3.amazonaws.com'}")
        folder = f"{prefix}/" if prefix else ""
        objects = [o for o in client.list_objects(bucket, prefix=folder or None, recursive=True) if not o.is_dir]
        if not objects and prefix:
            # Not a folder: perhaps one object (a .gguf) named by the full key.
            objects = [o for o in client.list_objects(bucket, prefix=prefix) if o.object_name == prefix]
            folder = prefix[: prefix.rfind("/") + 1]
    if not objects:
        raise JobError(f"source {spec}: no objects under this prefix; check the prefix (keys are case-sensitive)")
    files = [
        SourceFile(o.object_name[len(folder):], int(o.size or 0), _object_reader(client, bucket, o.object_name, o.etag, settings))
        for o in objects
        if not o.object_name.endswith("/")  # folder markers some tools create
    ]  # fmt: skip
    return Listing(files, {"bucket": bucket, "prefix": prefix, "endpoint": settings.endpoint or "s3.amazonaws.com"})


def plain_md5(etag: str | None, headers) -> str | None:
    """The object's MD5 when its ETag is one: not multipart (`-N`), not SSE-KMS or SSE-C."""
    etag = (etag or "").strip('"').lower()
    if not _PLAIN_MD5.fullmatch(etag):
        return None
    if headers.get("x-amz-server-side-encryption") == "aws:kms" or headers.get(
        "x-amz-server-side-encryption-customer-algorithm"
    ):
        return None
    return etag


def _object_reader(client, bucket: str, key: str, etag: str | None, settings: S3Settings):
    where = f"s3://{bucket}/{key}"

    @contextlib.contextmanager
    def read() -> Iterator[Iterator[bytes]]:
        with s3_errors(f"reading {where}", settings):
            response = client.get_object(bucket, key)
        try:
            yield _verified_chunks(response, where, plain_md5(response.headers.get("ETag") or etag, response.headers), settings)
        finally:
            response.close()
            response.release_conn()

    return read


def _verified_chunks(response, where: str, md5: str | None, settings: S3Settings) -> Iterator[bytes]:
    digest = hashlib.md5(usedforsecurity=False)
    with s3_errors(f"reading {where}", settings):
        for chunk in response.stream(CHUNK_SIZE):
            digest.update(chunk)
            yield chunk
    if md5 is not None and digest.hexdigest() != md5:
        # The bytes differ from what S3 stored: a corrupted transfer, or the object was replaced mid-read.
        raise TransientJobError(f"{where}: MD5 {digest.hexdigest()} does not match the ETag {md5}; will retry")
