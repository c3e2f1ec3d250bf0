"""systemd integration: readiness notification and log priorities for the journal.

`Notifier` implements the sending side of sd_notify(3) without libsystemd:
one datagram of newline-separated ``NAME=value`` fields to the AF_UNIX
socket that systemd names in ``$NOTIFY_SOCKET`` for a ``Type=notify``
service. Without that variable every send does nothing.
"""

import logging
import os
import socket

log = logging.getLogger(__name__)

# sd-daemon(3) priority prefixes, which journald reads off each line of a
# service's stderr.
_JOURNAL_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def notify_address(value: str) -> str | bytes | None:
    """Return the socket address named by a ``$NOTIFY_SOCKET`` value, or None.

    A value starting with ``@`` names a socket in the abstract namespace.
    Other forms (systemd 254 added ``vsock:``) are not supported.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


class Notifier:
    """Sender of state changes to the service manager, inactive outside systemd."""

    def __init__(self, address: str | bytes | None):
        self._address = address
        self._failed = False
        self._stopping_sent = False

    @classmethod
    def from_environment(cls) -> "Notifier":
        """Take ``$NOTIFY_SOCKET`` out of the environment and return its notifier.

        The variable is removed so that no child process (fusermount3,
        mount) sends on the daemon's behalf.
        """
        value = os.environ.pop("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        address = notify_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET %r is not a Unix socket address, so systemd "
                        "gets no notifications", value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send *fields* such as ``READY=1`` in one datagram; return whether it was sent.

        A failure is logged once and not raised, because a mount that
        serves matters more than the service manager's view of it.
        """
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %r: %s", self._address, exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> bool:
        """Send ``STOPPING=1`` the first time the daemon starts to stop; later calls do nothing."""
        if self._stopping_sent:
            return False
        self._stopping_sent = True
        return self.send("STOPPING=1", "STATUS=unmounting")


def stderr_goes_to_journal() -> bool:
    """Return whether stderr is the journal stream that systemd set up.

    systemd puts the device and inode of that stream in ``$JOURNAL_STREAM``
    (systemd.exec(5)); a stderr redirected elsewhere does not match them.
    """
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(2)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """Formats a record as ``<priority>name: message``, with no timestamp.

    The journal adds its own timestamp and turns the prefix into the
    entry's priority, so ``journalctl -p warning`` finds warnings.
    """

    def __init__(self):
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _JOURNAL_PRIORITIES.get(record.levelno, 6)
        text = super().format(record)
        # A traceback spans lines; each line is an entry of its own.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def use_journal_format() -> bool:
    """Switch the root logger's handlers to `JournalFormatter` if stderr is the journal."""
    if not stderr_goes_to_journal():
        return False
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JournalFormatter())
    return True
