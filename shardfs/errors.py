"""Domain exceptions and the one table that maps them to errno values.

Lower layers raise these; the FUSE adapter turns them into errno replies
through `errno_for`, and the command line prints them as one-line messages.
"""

import errno


class ShardfsError(Exception):
    """Base class of every error shardfs raises on purpose."""


class UsageError(ShardfsError):
    """A command-line value or local precondition is invalid."""


class StoreError(ShardfsError):
    """A store request failed."""


class StoreNotFound(StoreError):
    def __init__(self, url: str, detail: str):
        # A colon, not brackets, because a detail may contain brackets of its own.
        super().__init__(f"store not found: {url}: {detail}")
        self.url = url


class StoreAccessDenied(StoreError):
    def __init__(self, url: str, detail: str):
        super().__init__(f"access denied by store {url}: {detail}")
        self.url = url


class StoreUnavailable(StoreError):
    def __init__(self, url: str, detail: str):
        super().__init__(f"store {url} is unreachable: {detail}")
        self.url = url


class ObjectNotFound(StoreError):
    def __init__(self, key: str):
        super().__init__(f"object {key} is missing from the store")
        self.key = key


class ObjectInvalid(StoreError):
    """An object exists but cannot be read as one, such as a FIFO in place of a file.

    Reading it again gives the same result, so callers treat it as damage
    to that object, not as a store outage.
    """

    def __init__(self, url: str, key: str, reason: str):
        super().__init__(f"object {key} in store {url} is invalid: {reason}")
        self.key = key
        self.reason = reason


class ModelNotFound(ShardfsError):
    def __init__(self, model: str, url: str):
        super().__init__(f"model {model!r} not found in store {url}")
        self.model = model


class ChunkCorrupt(ShardfsError):
    def __init__(self, key: str, reason: str):
        super().__init__(f"chunk {key} is corrupt: {reason}")
        self.key = key
        self.reason = reason


class ChunkLengthWrong(ChunkCorrupt):
    """A good chunk object whose manifest gives it another length.

    The object decodes to bytes that match its key, so the manifest is
    wrong, not the object: fetching again cannot help, and the copy is
    not damaged.
    """

    def __init__(self, key: str, actual: int, expected: int):
        super().__init__(
            key, f"the chunk object is {actual} bytes and good, but the manifest gives {expected}"
        )
        self.actual = actual
        self.expected = expected


class ChunkEncodingUnknown(ChunkCorrupt):
    """A chunk object names a codec or transform this version does not define.

    A newer shardfs wrote it; the bytes are never guessed at.
    """

    def __init__(self, key: str, codec_id: int, transform_id: int, flags: int = 0):
        encoding = f"codec {codec_id}, transform {transform_id}"
        if flags:
            encoding += f", flags {flags:#06x}"
        reason = (
            f"encoding {encoding} is not supported by this version of shardfs; "
            "upgrade shardfs to read it"
        )
        ShardfsError.__init__(self, f"chunk {key} cannot be decoded: {reason}")
        self.key = key
        self.reason = reason


class ChunkUnavailable(ShardfsError):
    """No good copy of a chunk arrived within the read deadline."""

    def __init__(self, key: str, attempts: int, seconds: float, cause: BaseException | None):
        reason = f"{cause}" if cause is not None else "no response"
        super().__init__(
            f"chunk {key} not fetched after {attempts} attempts in {seconds:.1f} s: {reason}"
        )
        self.key = key
        self.cause = cause


class ManifestInvalid(ShardfsError):
    def __init__(self, model: str, reason: str):
        super().__init__(f"manifest of model {model!r} is invalid: {reason}")
        self.model = model
        self.reason = reason


class ReadFailed(ShardfsError):
    """A read of a mounted file failed; names the file, range and cause."""

    def __init__(self, model: str, path: str, start: int, end: int, cause: Exception):
        super().__init__(
            f"read of {model}/{path} bytes {start}-{end} failed: {cause}"
        )
        self.cause = cause


# Checked in order, so subclasses come before their bases.
_ERRNO_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (ReadFailed, errno.EIO),
    (ObjectNotFound, errno.EIO),
    (ObjectInvalid, errno.EIO),
    (ChunkUnavailable, errno.EIO),
    (ChunkCorrupt, errno.EIO),
    (StoreUnavailable, errno.EIO),
    (StoreError, errno.EIO),
    (ManifestInvalid, errno.EIO),
)


def errno_for(exc: BaseException) -> int:
    """Return the errno a reader sees for *exc*; unknown errors become EIO."""
    for exc_type, code in _ERRNO_TABLE:
        if isinstance(exc, exc_type):
            return code
    return errno.EIO
