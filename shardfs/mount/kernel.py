"""Per-mount kernel settings that only sysfs exposes.

The FUSE mount protocol has no field for a mount's read-ahead or for the
number of background requests the kernel queues, but root may set both
through sysfs once the mount exists. Each setting that cannot be applied
(not root, no fusectl) is logged and left at the kernel default.
"""

import logging
import os
import subprocess

log = logging.getLogger(__name__)

FUSECTL_DIR = "/sys/fs/fuse/connections"


def _write(path: str, value: int) -> bool:
    try:
        with open(path, "w") as file:
            file.write(f"{value}\n")
        return True
    except OSError as exc:
        log.info("cannot set %s to %d: %s", path, value, exc.strerror)
        return False


def _ensure_fusectl() -> None:
    if os.path.isdir(FUSECTL_DIR) and not os.listdir(FUSECTL_DIR):
        subprocess.run(
            ["mount", "-t", "fusectl", "fusectl", FUSECTL_DIR],
            capture_output=True,
            check=False,
        )


def tune_mount(mountpoint: str, read_ahead_kb: int, max_background: int) -> dict[str, int]:
    """Apply the settings to the FUSE mount at *mountpoint*; return those applied."""
    device = os.stat(mountpoint).st_dev
    major, minor = os.major(device), os.minor(device)
    applied = {}
    if read_ahead_kb > 0:
        path = f"/sys/class/bdi/{major}:{minor}/read_ahead_kb"
        if _write(path, read_ahead_kb):
            applied["read_ahead_kb"] = read_ahead_kb
    if max_background > 0:
        _ensure_fusectl()
        connection = os.path.join(FUSECTL_DIR, str(minor))
        # The kernel marks the mount congested at this many background
        # requests; keep it at three quarters, the kernel's own ratio.
        if _write(os.path.join(connection, "max_background"), max_background):
            applied["max_background"] = max_background
            _write(os.path.join(connection, "congestion_threshold"), max_background * 3 // 4)
    return applied
