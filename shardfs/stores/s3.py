"""A store under an ``s3://bucket/prefix`` root, through boto3.

Credentials come from boto3's standard chain (environment, profile, instance
role). botocore errors are classified by their error code and HTTP status,
never by message text, into the store errors of `shardfs.errors`.
"""

import os
import urllib.parse
from collections.abc import Iterator

import boto3
import botocore.config
import botocore.exceptions

from shardfs.config import StoreConfig
from shardfs.errors import (
    ObjectNotFound,
    StoreAccessDenied,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
    UsageError,
)
from shardfs.stores.base import ObjectInfo

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
}


def split_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into the bucket and a prefix ending in '/'."""
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Store:
    def __init__(self, config: StoreConfig):
        self.url = config.url
        self.bucket, self.prefix = split_s3_url(config.url)
        self._config = config
        client_config = botocore.config.Config(
            max_pool_connections=config.max_connections,
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            retries={"mode": "standard", "max_attempts": 3},
        )
        endpoint = config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint is not None:
            check_endpoint_url(endpoint)
        # A client is safe to share between threads, but creating one is not;
        # it is made once here, on the caller's thread.
        try:
            session = boto3.session.Session()
            self._client = session.client(
                "s3", endpoint_url=config.endpoint_url, config=client_config
            )
        except botocore.exceptions.ProfileNotFound as exc:
            raise UsageError(f"{exc}; check AWS_PROFILE or ~/.aws/config") from None
        except (ValueError, botocore.exceptions.BotoCoreError) as exc:
            raise UsageError(f"cannot set up the S3 client for {config.url}: {exc}") from None

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) == 404 or _code(exc) in _NO_BUCKET_CODES:
                raise StoreNotFound(self.url, f"bucket {self.bucket!r} does not exist")
            raise self._error(exc, "") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, "") from None

    def get(self, key: str) -> bytes:
        return self._get(key, None)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._get(key, f"bytes={start}-{end - 1}")

    def _get(self, key: str, byte_range: str | None) -> bytes:
        kwargs = {"Bucket": self.bucket, "Key": self.prefix + key}
        if byte_range:
            kwargs["Range"] = byte_range
        try:
            response = self._client.get_object(**kwargs)
            return response["Body"].read()
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "InvalidRange":
                return b""
            raise self._error(exc, key) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, key) from None

    def head(self, key: str) -> int | None:
        info = self.stat(key)
        return None if info is None else info.size

    def put(self, key: str, data: bytes) -> None:
        # One PUT is atomic in S3: readers see the old object or the new one.
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except botocore.exceptions.ClientError as exc:
            raise self._error(exc, key) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, key) from None

    def list(self, prefix: str) -> Iterator[str]:
        for info in self.list_info(prefix):
            yield info.key

    def remove_partial_writes(self, cutoff: float, dry_run: bool = False) -> tuple[int, int]:
        # Every put is a single PUT, which S3 applies whole or not at all.
        return 0, 0

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    yield ObjectInfo(
                        item["Key"][len(self.prefix) :],
                        item["Size"],
                        item["LastModified"].timestamp(),
                    )
        except botocore.exceptions.ClientError as exc:
            raise self._error(exc, prefix) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, prefix) from None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _NOT_FOUND_CODES:
                return None
            raise self._error(exc, key) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, key) from None
        return ObjectInfo(key, response["ContentLength"], response["LastModified"].timestamp())

    def touch(self, key: str) -> None:
        # S3 has no utime: copying an object onto itself is what renews
        # LastModified, and it is allowed only when the metadata is replaced.
        try:
            self._client.copy_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                CopySource={"Bucket": self.bucket, "Key": self.prefix + key},
                MetadataDirective="REPLACE",
                Metadata={"shardfs-touched": "1"},
            )
        except botocore.exceptions.ClientError as exc:
            raise self._error(exc, key) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, key) from None

    def delete(self, key: str) -> None:
        # S3 returns success for a delete of a missing key.
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except botocore.exceptions.ClientError as exc:
            raise self._error(exc, key) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._error(exc, key) from None

    def _error(self, exc: Exception, key: str) -> StoreError:
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return StoreAccessDenied(self.url, "no AWS credentials found")
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            # Connection refused, DNS failure, timeouts: the message names the
            # endpoint and the cause, and carries no credentials.
            return StoreUnavailable(self.url, str(exc))
        code = _code(exc)
        if code in _NO_BUCKET_CODES:
            return StoreNotFound(self.url, f"bucket {self.bucket!r} does not exist")
        if code in _NOT_FOUND_CODES:
            return ObjectNotFound(key)
        if code in _DENIED_CODES:
            return StoreAccessDenied(self.url, f"{code} on {key or self.bucket!r}")
        status = _status(exc)
        if status is not None and status >= 500:
            return StoreUnavailable(self.url, f"HTTP {status} {code} on {key!r}")
        return StoreError(f"store {self.url}: {code} on {key!r}")


def check_endpoint_url(url: str) -> None:
    """Raise `UsageError` unless *url* is an http:// or https:// URL with a host."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(
            f"invalid endpoint URL {url!r}: expected http://HOST:PORT or https://HOST"
        )


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: botocore.exceptions.ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
