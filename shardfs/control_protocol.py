"""The local control channel between a mount's daemon and the command line.

The daemon listens on a Unix socket whose path derives from the mountpoint,
in a directory only its owner can enter; it also checks each peer's uid.
Requests and replies are JSON objects, one per line. A request may get
several replies (progress), the last of which has ``"done": true``.
"""

import hashlib
import json
import os
import socket

from shardfs.errors import UsageError


def runtime_dir() -> str:
    """Return the directory of control sockets: /run/shardfs for root."""
    if os.geteuid() == 0:
        return "/run/shardfs"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/shardfs-{os.geteuid()}"
    return os.path.join(base, "shardfs")


def socket_path(mountpoint: str) -> str:
    """Return the control socket of the mount at *mountpoint*.

    A hash of the absolute path names it, since a socket path is limited to
    107 bytes and mountpoints can be longer.
    """
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:24]
    return os.path.join(runtime_dir(), f"{digest}.sock")


def request(mountpoint: str, message: dict, timeout_s: float | None = 30.0):
    """Send *message* to the daemon of *mountpoint*; yield its replies.

    Raises `UsageError` when no daemon serves that mountpoint or it rejects
    the request.
    """
    path = socket_path(mountpoint)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout_s)
    try:
        connection.connect(path)
    except FileNotFoundError:
        connection.close()
        raise UsageError(f"no shardfs daemon serves {mountpoint!r}") from None
    except PermissionError:
        connection.close()
        raise UsageError(
            f"permission denied on the control socket of {mountpoint!r}: "
            "run as root or as the user who mounted it"
        ) from None
    except OSError as exc:
        connection.close()
        raise UsageError(f"cannot reach the daemon of {mountpoint!r}: {exc.strerror}") from None
    with connection, connection.makefile("rwb") as stream:
        stream.write(json.dumps(message).encode() + b"\n")
        stream.flush()
        for line in stream:
            reply = json.loads(line)
            if "error" in reply:
                raise UsageError(reply["error"])
            yield reply
            if reply.get("done"):
                return
    raise UsageError(f"the daemon of {mountpoint!r} closed the connection")
