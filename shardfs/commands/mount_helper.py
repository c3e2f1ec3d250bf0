"""``mount.fuse.shardfs``: the helper that mount(8) runs for type fuse.shardfs.

For ``mount -t fuse.shardfs STORE MOUNTPOINT -o OPTIONS``, and for an
/etc/fstab line of that type, util-linux looks for /sbin/mount.fuse.shardfs
before the generic /sbin/mount.fuse, and runs it as::

    mount.fuse.shardfs STORE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTIONS]

Every ``shardfs mount`` flag is an option of the same name with ``_`` for
``-`` (``cache_size=50G``, ``allow_other``, ``no_prefetch``), and
``config=PATH`` names the config file. The helper starts the daemon in the
background and returns once the mount responds, like ``shardfs mount``.
When a responding mount of the same store is on the mountpoint already,
it returns 0 and starts nothing, so ``mount -a`` can run again.
Its exit status follows mount(8): 0 mounted, 1 invalid invocation or
options, 8 interrupted, 32 the mount failed.
"""

import logging
import sys

from shardfs.commands import mount_cmd
from shardfs.commands.entry_point import configure_logging, run_with_exit_status
from shardfs.config_file import CONFIG_OPTION, SETTINGS, SettingValue
from shardfs.errors import UsageError
from shardfs.mount.mount_table import store_mounted_at

log = logging.getLogger(__name__)

EXIT_USAGE = 1
EXIT_MOUNT_FAILED = 32
EXIT_INTERRUPTED = 8

# Generic mount options that change nothing here. The mount is always
# read-only, nosuid and nodev, so "rw" (which mount(8) passes when "ro" is
# not given), "suid" and "dev" (which mount.fuse3 adds) are accepted too.
# The others are for mount(8) and systemd's fstab generator.
IGNORED_OPTIONS = frozenset(
    {"ro", "rw", "defaults", "nosuid", "nodev", "suid", "dev", "exec",
     "auto", "noauto", "nofail", "_netdev"}
)
# NOTE: noexec (which the fstab option "user" implies) is rejected, because
# MountConfig has no field that would pass it to the kernel mount.
UNSUPPORTED_OPTIONS = {
    "noexec": "shardfs mounts cannot be noexec yet",
    "user": "shardfs mounts are made by root",
    "users": "shardfs mounts are made by root",
}



def _helper_options() -> dict[str, tuple[str, bool | None]]:
    """Map each helper option name to its setting key and, for a bare flag, its value.

    A boolean setting has two bare flags (allow_other, no_allow_other);
    every other setting takes name=value, marked by None.
    """
    options = {}
    for setting in SETTINGS.values():
        if setting.option_name is None:
            continue
        if setting.is_boolean:
            options[setting.option_name] = (setting.key, True)
            options[f"no_{setting.option_name}"] = (setting.key, False)
        else:
            options[setting.option_name] = (setting.key, None)
    return options


HELPER_OPTIONS = _helper_options()


class HelperRequest:
    """A mount(8) request to the helper: its arguments, options and flags."""

    def __init__(self):
        self.store: str | None = None
        self.mountpoint: str | None = None
        self.options: list[str] = []
        self.sloppy = False
        self.fake = False
        self.verbose = False


def parse_arguments(argv: list[str]) -> HelperRequest:
    """Parse the argument list that mount(8) passes to a helper."""
    request = HelperRequest()
    if len(argv) < 2 or argv[0].startswith("-") or argv[1].startswith("-"):
        raise UsageError(
            "usage: mount.fuse.shardfs STORE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTIONS]"
        )
    request.store, request.mountpoint = argv[0], argv[1]
    arguments = iter(argv[2:])
    for argument in arguments:
        if argument in ("-o", "-t"):
            value = next(arguments, None)
            if value is None:
                raise UsageError(f"option {argument} needs a value")
            if argument == "-o":
                request.options += value.split(",")
        elif argument == "-s":
            request.sloppy = True
        elif argument == "-f":
            request.fake = True
        elif argument == "-v":
            request.verbose = True
        elif argument == "-n":
            continue  # no /etc/mtab to skip: the kernel's mount table is all there is
        else:
            raise UsageError(f"unsupported argument {argument!r} to mount.fuse.shardfs")
    return request


def settings_from_options(
    options: list[str], sloppy: bool
) -> tuple[str | None, dict[str, SettingValue]]:
    """Return the config file path and the settings that *options* give."""
    config_path = None
    overrides: dict[str, SettingValue] = {}
    for option in options:
        name, has_value, value = option.partition("=")
        if not option or option in IGNORED_OPTIONS or name.startswith("x-") or name == "comment":
            continue
        if name == CONFIG_OPTION:
            if not value:
                raise UsageError("option config=PATH needs a path")
            config_path = value
            continue
        if name in UNSUPPORTED_OPTIONS:
            raise UsageError(f"option {name} is not supported: {UNSUPPORTED_OPTIONS[name]}")
        if name not in HELPER_OPTIONS:
            if sloppy:
                log.warning("ignoring unknown option %s", option)
                continue
            raise UsageError(f"unknown option {option!r} for a shardfs mount")
        key, flag_value = HELPER_OPTIONS[name]
        if flag_value is None and not has_value:
            raise UsageError(f"option {name} needs a value, as {name}=VALUE")
        if flag_value is not None and has_value:
            raise UsageError(f"option {name} takes no value, but got {option!r}")
        option_value = value if flag_value is None else flag_value
        overrides[key] = SettingValue.from_option(name, option_value)
    return config_path, overrides


def run(argv: list[str]) -> int:
    request = parse_arguments(argv)
    if request.verbose:
        logging.getLogger().setLevel(logging.INFO)
    config_path, overrides = settings_from_options(request.options, request.sloppy)
    overrides["store"] = SettingValue(request.store, f"STORE {request.store!r}", from_text=True)
    overrides["mountpoint"] = SettingValue(
        request.mountpoint, f"MOUNTPOINT {request.mountpoint!r}", from_text=True
    )
    resolved = mount_cmd.resolve_settings(config_path, overrides)
    store = mount_cmd.store_config(config_path, overrides, resolved)
    if request.fake:
        # mount -f: check everything, mount nothing.
        return 0
    # mount -a runs the helper for every fstab line that it does not find
    # mounted. A line that is mounted already, by this store at this
    # mountpoint, succeeds without a second daemon.
    if store_mounted_at(store, resolved["mountpoint"]):
        log.info("store %s is already mounted at %s", request.store, resolved["mountpoint"])
        return 0
    return mount_cmd.mount(config_path, overrides, foreground=False)


def main(argv: list[str] | None = None) -> int:
    configure_logging(logging.WARNING)
    arguments = sys.argv[1:] if argv is None else argv
    return run_with_exit_status(
        lambda: run(arguments),
        exit_usage=EXIT_USAGE,
        exit_failed=EXIT_MOUNT_FAILED,
        exit_interrupted=EXIT_INTERRUPTED,
    )
