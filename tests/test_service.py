"""shardfs as a system service: the systemd unit, sd_notify, and the fstab helper.

Where systemd is not PID 1 (containers, CI), the unit is checked with
``systemd-analyze verify`` and its ExecStart is run the way systemd runs
it: the same command line, with $NOTIFY_SOCKET and $CACHE_DIRECTORY set,
under the unit's capability bounding set and no_new_privs (through
setpriv), and stopped with SIGTERM to the main process (KillMode=mixed).
"""

import configparser
import logging
import mmap
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from conftest import (
    TINY_MODEL_FILE,
    TINY_MODEL_SIZE,
    free_port,
    needs_fuse,
    run_shardfs,
    wait_unmounted,
)
from s3proxy import counting_proxy  # noqa: F401 (a fixture)
from shardfs.commands import mount_helper
from shardfs.errors import UsageError
from shardfs.mount import notify

REPOSITORY = os.path.join(os.path.dirname(__file__), os.pardir)
UNIT_PATH = os.path.join(REPOSITORY, "systemd", "shardfs@.service")
INSTALLED_COMMAND = "/usr/local/bin/shardfs"
SCRIPTS = os.path.dirname(sys.executable)
HELPER_LINK = "/sbin/mount.fuse.shardfs"
READY_TIMEOUT_S = 60

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def read_unit() -> configparser.ConfigParser:
    # systemd allows repeated keys, which strict=False reduces to the last
    # one. The unit repeats none, so nothing is lost.
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT_PATH)
    return unit


def service_setting(key: str) -> str:
    return read_unit()["Service"][key]


# sd_notify


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket in place of systemd's notification socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(READY_TIMEOUT_S)
    yield path, sock
    sock.close()


def receive_fields(sock: socket.socket) -> dict[str, str]:
    """Receive one notification and return its fields."""
    message = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in message.splitlines())


def test_notifier_sends_to_socket_path(notify_socket):
    path, sock = notify_socket
    notifier = notify.Notifier(notify.notify_address(path))
    assert notifier.ready("serving 2 models")
    assert receive_fields(sock) == {"READY": "1", "STATUS": "serving 2 models"}


def test_notifier_sends_to_abstract_socket():
    name = f"shardfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = notify.Notifier(notify.notify_address(f"@{name}"))
        assert notifier.stopping()
        assert receive_fields(sock) == {"STOPPING": "1", "STATUS": "unmounting"}


def test_notifier_sends_stopping_once(notify_socket):
    path, sock = notify_socket
    notifier = notify.Notifier(path)
    assert notifier.stopping()
    assert not notifier.stopping()
    receive_fields(sock)
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_notifier_takes_variable_from_environment(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = notify.Notifier.from_environment()
    assert "NOTIFY_SOCKET" not in os.environ
    assert notifier.enabled
    assert notifier.ready("up")
    assert receive_fields(sock)["READY"] == "1"


def test_notifier_without_variable_sends_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = notify.Notifier.from_environment()
    assert not notifier.enabled
    assert not notifier.ready("up")


def test_notifier_rejects_vsock_address(monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    notifier = notify.Notifier.from_environment()
    assert not notifier.enabled
    assert "NOTIFY_SOCKET 'vsock:2:1234' is not a Unix socket address" in caplog.text


def test_notifier_failure_logged_once(tmp_path, caplog):
    notifier = notify.Notifier(str(tmp_path / "absent.sock"))
    with caplog.at_level(logging.WARNING):
        assert not notifier.send("READY=1")
        assert not notifier.send("READY=1")
    warnings = [record for record in caplog.records if "cannot notify systemd" in record.message]
    assert len(warnings) == 1


def test_journal_format_when_stderr_is_journal(tmp_path):
    log_path = tmp_path / "stderr.txt"
    script = (
        "import logging, sys\n"
        "from shardfs.mount import notify\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "print(notify.use_journal_format(), flush=True)\n"
        "logging.getLogger('shardfs.test').warning('cache is full')\n"
        "logging.getLogger('shardfs.test').info('mounted')\n"
    )
    with open(log_path, "wb") as stderr:
        info = os.fstat(stderr.fileno())
        environment = dict(os.environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        result = subprocess.run(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=stderr,
            env=environment, text=True, timeout=60,
        )
    assert result.stdout.strip() == "True"
    assert log_path.read_text().splitlines() == [
        "<4>shardfs.test: cache is full",
        "<6>shardfs.test: mounted",
    ]


def test_journal_format_off_for_other_stderr(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not notify.stderr_goes_to_journal()


# The unit file


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    with open(UNIT_PATH) as file:
        text = file.read()
    if not os.access(INSTALLED_COMMAND, os.X_OK):
        # verify checks that ExecStart's program exists; use this checkout's.
        text = text.replace(INSTALLED_COMMAND, os.path.join(SCRIPTS, "shardfs"))
    (tmp_path / "shardfs@.service").write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "shardfs@models.service")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if "shardfs@" in line]
    assert complaints == []


def test_unit_orders_and_restarts():
    unit = read_unit()
    assert "network-online.target" in unit["Unit"]["After"].split()
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    assert "remote-fs.target" in unit["Unit"]["Before"].split()
    assert unit["Install"]["WantedBy"] == "remote-fs.target"
    assert unit["Service"]["Type"] == "notify"
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Service"]["RestartPreventExitStatus"] == "2"
    assert unit["Service"]["CacheDirectory"] == "shardfs/%i"
    assert "--config /etc/shardfs/%i.toml" in unit["Service"]["ExecStart"]


# Settings that give a service a mount namespace of its own: with any of
# them, the FUSE mount would not be visible outside the service.
NAMESPACE_SETTINGS = (
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadOnlyPaths",
    "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
    "RootDirectory", "PrivateUsers", "DynamicUser", "MountFlags",
)


def test_unit_hardening_keeps_mount_visible():
    service = read_unit()["Service"]
    assert service["CapabilityBoundingSet"] == "CAP_SYS_ADMIN"
    assert service["DeviceAllow"] == "/dev/fuse rw"
    assert service["NoNewPrivileges"] == "yes"
    present = [name for name in NAMESPACE_SETTINGS if name in service]
    assert present == []


# The unit's ExecStart, run the way systemd runs it


def service_command(config_dir: str, instance: str) -> list[str]:
    """Return the unit's ExecStart for *instance*, with this checkout's paths.

    As root with setpriv installed, the command runs with no_new_privs
    and only the capabilities of the unit's CapabilityBoundingSet.
    """
    words = service_setting("ExecStart").replace("%i", instance).split()
    words[0] = os.path.join(SCRIPTS, "shardfs")
    words = [word.replace("/etc/shardfs/", f"{config_dir}/") for word in words]
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return words
    capabilities = service_setting("CapabilityBoundingSet").lower().replace("cap_", "+")
    bounding = ",".join(["-all", *capabilities.split()])
    return ["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all", *words]


class Service:
    """One instance of the unit, started as systemd would start it."""

    def __init__(self, tmp_path, config_text: str, notify_path: str):
        self.instance = "test"
        self.mountpoint = tmp_path / "mnt"
        self.mountpoint.mkdir(exist_ok=True)
        config_dir = tmp_path / "etc"
        config_dir.mkdir(exist_ok=True)
        config = config_dir / f"{self.instance}.toml"
        config.write_text(config_text.format(mountpoint=self.mountpoint))
        config.chmod(0o644)
        self.log_path = tmp_path / "journal.txt"
        environment = dict(os.environ, NOTIFY_SOCKET=notify_path)
        environment["CACHE_DIRECTORY"] = str(tmp_path / "cache" / self.instance)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                service_command(str(config_dir), self.instance),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env=environment, cwd="/",
            )

    def journal(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Stop it as KillMode=mixed does: SIGTERM to the main process, then wait."""
        self.process.send_signal(signal.SIGTERM)
        timeout = float(service_setting("TimeoutStopSec"))
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)


@pytest.fixture
def start_service(tmp_path, notify_socket):
    services = []

    def start(config_text: str) -> Service:
        service = Service(tmp_path, config_text, notify_socket[0])
        services.append(service)
        return service

    yield start
    for service in services:
        service.close()


# A process that keeps a file open and mapped until its stdin closes.
HOLDER = """
import mmap, sys
file = open(sys.argv[1], "rb")
mapping = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
print(len(mapping[:4096]), flush=True)
sys.stdin.read()
"""


@needs_fuse
def test_service_ready_only_after_mount_responds(
    tmp_path, tiny_source, notify_socket, start_service, counting_proxy, moto_endpoint, s3_store
):
    upload = run_shardfs(
        "push", "--store", s3_store, "--endpoint-url", moto_endpoint, str(tiny_source), "org/tiny"
    )
    assert upload.returncode == 0, upload.stderr
    # Slow store requests keep the daemon listing models for a while
    # before it mounts, so an early READY=1 would arrive before the mount.
    counting_proxy.delay_s = 0.5
    service = start_service(
        f'store = "{s3_store}"\nendpoint_url = "{counting_proxy.url}"\n'
        'mountpoint = "{mountpoint}"\n'
    )
    _, sock = notify_socket
    fields = receive_fields(sock)
    assert os.path.ismount(service.mountpoint)
    assert (service.mountpoint / TINY_MODEL_FILE).stat().st_size == TINY_MODEL_SIZE
    assert fields["READY"] == "1"
    assert fields["STATUS"] == f"serving 1 model of {s3_store} at {service.mountpoint}"
    assert "is ready" in service.journal()
    assert service.stop() == 0


@needs_fuse
def test_service_stops_with_file_open_and_mapped(
    tmp_path, tiny_store, tiny_source, notify_socket, start_service
):
    service = start_service(f'store = "{tiny_store}"\nmountpoint = "{{mountpoint}}"\n')
    _, sock = notify_socket
    assert receive_fields(sock)["READY"] == "1"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(service.mountpoint / TINY_MODEL_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "4096"
        # A plain unmount fails while the file is busy; a stop must not.
        busy = subprocess.run(
            ["fusermount3", "-u", str(service.mountpoint)], capture_output=True, text=True
        )
        assert busy.returncode != 0
        assert service.stop() == 0
        assert receive_fields(sock)["STOPPING"] == "1"
        assert not os.path.ismount(service.mountpoint)
        assert holder.poll() is None
    finally:
        holder.stdin.close()
        holder.stdout.close()
        holder.wait(timeout=30)
    journal = service.journal()
    assert "received SIGTERM, unmounting" in journal
    assert "Traceback" not in journal
    assert (tmp_path / "cache" / service.instance / "stats.json").exists()


@needs_fuse
def test_service_cache_in_cache_directory(tmp_path, tiny_store, notify_socket, start_service):
    service = start_service(f'store = "{tiny_store}"\nmountpoint = "{{mountpoint}}"\n')
    assert receive_fields(notify_socket[1])["READY"] == "1"
    assert (service.mountpoint / TINY_MODEL_FILE).read_bytes()
    assert service.stop() == 0
    cache = tmp_path / "cache" / service.instance
    assert (cache / "chunks").is_dir()
    assert (cache / "manifests").exists()


def assert_no_notification(sock: socket.socket) -> None:
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


@needs_fuse
def test_service_bad_config_not_restarted(tmp_path, tiny_store, notify_socket, start_service):
    service = start_service(
        f'store = "{tiny_store}"\nmountpoint = "{{mountpoint}}"\nmax_connections = 0\n'
    )
    status = service.process.wait(timeout=60)
    # RestartPreventExitStatus= keeps systemd from restarting this status.
    assert str(status) in service_setting("RestartPreventExitStatus").split()
    lines = service.journal().strip().splitlines()
    assert len(lines) == 1
    assert "invalid max_connections = 0 in" in lines[0]
    assert_no_notification(notify_socket[1])


@needs_fuse
def test_service_unreachable_store_restarted(tmp_path, notify_socket, start_service):
    endpoint = f"http://127.0.0.1:{free_port()}"
    service = start_service(
        f'store = "s3://absent/root"\nendpoint_url = "{endpoint}"\n'
        'mountpoint = "{mountpoint}"\nread_timeout = 2\n'
    )
    status = service.process.wait(timeout=120)
    assert status == 1
    assert str(status) not in service_setting("RestartPreventExitStatus").split()
    assert "unreachable" in service.journal()
    assert not os.path.ismount(service.mountpoint)
    assert_no_notification(notify_socket[1])


# The unit's system call filter, checked against a traced daemon


def syscall_groups() -> dict[str, list[str]]:
    """Return systemd's system call groups, such as @mount, with their members."""
    output = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith(" ") and stripped.startswith("@"):
            current = groups.setdefault(stripped, [])
        elif current is not None:
            current.append(stripped)
    return groups


def expand_filter(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls = set()
    for name in names:
        if name.startswith("@"):
            calls |= expand_filter(groups[name], groups)
        else:
            calls.add(name)
    return calls


TRACE_LINE = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)\((.*)")


def traced_calls(trace_path) -> list[tuple[str, str]]:
    """Return (system call, arguments) for each call in an ``strace -f`` log."""
    calls = []
    with open(trace_path, errors="replace") as trace:
        for line in trace:
            match = TRACE_LINE.match(line)
            if match and "resumed>" not in line:
                calls.append((match.group(1), match.group(2)))
    return calls


@needs_fuse
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@needs_systemd_analyze
def test_unit_sandbox_allows_daemon_calls(tmp_path, tiny_store):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    port = free_port()
    trace_path = tmp_path / "trace.txt"
    command = [
        "strace", "-f", "-qq", "-o", str(trace_path), os.path.join(SCRIPTS, "shardfs"),
        "--log-level", "INFO", "mount", "--foreground", "--cache-dir", str(tmp_path / "cache"),
        "--metrics-address", f"127.0.0.1:{port}", tiny_store, str(mountpoint),
    ]
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(command, stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 120
        while "is ready" not in log_path.read_text():
            assert daemon.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        path = mountpoint / TINY_MODEL_FILE
        assert len(path.read_bytes()) == TINY_MODEL_SIZE
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapping:
            assert len(mapping[-4096:]) == 4096
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            assert b"shardfs_reads_total" in reply.read()
        assert run_shardfs("status", str(mountpoint)).returncode == 0
        # Signals go to the daemon, strace's child, and strace exits with its status.
        with open(f"/proc/{daemon.pid}/task/{daemon.pid}/children") as children:
            (daemon_pid,) = [int(pid) for pid in children.read().split()]
        os.kill(daemon_pid, signal.SIGUSR1)
        time.sleep(0.5)
        os.kill(daemon_pid, signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)

    service = read_unit()["Service"]
    groups = syscall_groups()
    allowed = expand_filter(service["SystemCallFilter"].split(), groups)
    if service.get("ProtectClock") == "yes":
        allowed -= expand_filter(["@clock"], groups)
    calls = traced_calls(trace_path)
    assert calls, "strace recorded no system calls"
    assert sorted({name for name, _ in calls} - allowed) == []

    families = {f"AF_{family}" for name, arguments in calls if name in ("socket", "socketpair")
                for family in re.findall(r"^AF_(\w+)", arguments)}
    assert families <= set(service["RestrictAddressFamilies"].split())

    if service.get("MemoryDenyWriteExecute") == "yes":
        for name, arguments in calls:
            if name in ("mprotect", "pkey_mprotect"):
                assert "PROT_EXEC" not in arguments, arguments
            if name == "mmap":
                assert not ("PROT_WRITE" in arguments and "PROT_EXEC" in arguments), arguments


# The mount helper


def test_helper_maps_options_to_settings():
    options = ["ro", "_netdev", "nofail", "rw", "dev", "suid", "x-systemd.automount",
               "config=/etc/shardfs/models.toml", "cache_dir=/srv/cache", "cache_size=20%",
               "endpoint_url=http://127.0.0.1:9000", "allow_other", "no_prefetch",
               "read_timeout=5"]
    config_path, values = mount_helper.settings_from_options(options, sloppy=False)
    assert config_path == "/etc/shardfs/models.toml"
    assert {key: value.value for key, value in values.items()} == {
        "cache_dir": "/srv/cache",
        "cache_size": "20%",
        "endpoint_url": "http://127.0.0.1:9000",
        "allow_other": True,
        "prefetch.enabled": False,
        "read_timeout": "5",
    }
    assert values["cache_size"].label == "option cache_size=20%"


BAD_OPTIONS = {
    "unknown": (["bogus"], "unknown option 'bogus' for a shardfs mount"),
    "missing-value": (["cache_size"], "option cache_size needs a value, as cache_size=VALUE"),
    "value-for-flag": (["allow_other=1"], "option allow_other takes no value"),
    "empty-config": (["config="], "option config=PATH needs a path"),
    "noexec": (["noexec"], "option noexec is not supported"),
    "user": (["rw", "noexec", "nosuid", "nodev", "user"], "option noexec is not supported"),
}


@pytest.mark.parametrize("options, message", BAD_OPTIONS.values(), ids=BAD_OPTIONS)
def test_helper_rejects_bad_options(options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        mount_helper.settings_from_options(options, sloppy=False)


def test_helper_sloppy_ignores_unknown(caplog):
    _, values = mount_helper.settings_from_options(["bogus", "memory_limit=64M"], sloppy=True)
    assert list(values) == ["memory_limit"]
    assert "ignoring unknown option bogus" in caplog.text


def test_helper_parses_mount_arguments():
    request = mount_helper.parse_arguments(
        ["s3://b/p", "/mnt/m", "-s", "-n", "-v", "-o", "ro,cache_size=1G", "-o", "allow_other",
         "-t", "fuse.shardfs"]
    )
    assert (request.store, request.mountpoint) == ("s3://b/p", "/mnt/m")
    assert request.options == ["ro", "cache_size=1G", "allow_other"]
    assert request.sloppy and request.verbose and not request.fake


@pytest.mark.parametrize("argv", [[], ["/store"], ["-o", "ro", "/mnt"], ["/s", "/m", "-N", "ns"]],
                         ids=["empty", "one", "option-first", "namespace"])
def test_helper_rejects_bad_arguments(argv):
    with pytest.raises(UsageError):
        mount_helper.parse_arguments(argv)


@pytest.mark.parametrize(
    "options, status, mention",
    [("ro,cache_size=big", 1, "invalid option cache_size=big: expected a byte count"),
     ("ro,config=/absent.toml", 1, "config file /absent.toml not found")],
    ids=["bad-value", "missing-config"],
)
def test_helper_script_one_line_error(tmp_path, options, status, mention):
    helper = os.path.join(SCRIPTS, "mount.fuse.shardfs")
    if not os.access(helper, os.X_OK):
        pytest.skip("mount.fuse.shardfs is not installed; run pip install -e .")
    result = subprocess.run(
        [helper, str(tmp_path), str(tmp_path), "-o", options],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"shardfs: error: {mention}"), lines[0]


@pytest.fixture
def helper_installed():
    """/sbin/mount.fuse.shardfs, linked to this checkout's helper for the test."""
    helper = os.path.join(SCRIPTS, "mount.fuse.shardfs")
    if os.geteuid() != 0:
        pytest.skip("mount(8) with a helper in /sbin needs root")
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not installed (Debian package mount)")
    if not os.access(helper, os.X_OK):
        pytest.skip("mount.fuse.shardfs is not installed; run pip install -e .")
    if os.path.lexists(HELPER_LINK):
        if os.path.realpath(HELPER_LINK) != os.path.realpath(helper):
            pytest.skip(f"{HELPER_LINK} exists and is not this checkout's helper")
        yield HELPER_LINK
        return
    os.symlink(helper, HELPER_LINK)
    try:
        yield HELPER_LINK
    finally:
        os.unlink(HELPER_LINK)


def mount_type(path) -> str | None:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == str(path):
                return fields[2]
    return None


@pytest.fixture
def helper_mountpoint(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@needs_fuse
def test_mount_command_uses_helper(
    helper_installed, helper_mountpoint, tiny_store, tiny_source, tmp_path
):
    options = f"ro,_netdev,cache_dir={tmp_path / 'cache'},cache_size=64M,no_prefetch"
    options += ",read_ahead_kb=128"
    result = subprocess.run(
        ["mount", "-t", "fuse.shardfs", tiny_store, str(helper_mountpoint), "-o", options],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert mount_type(helper_mountpoint) == "fuse.shardfs"
    assert (helper_mountpoint / TINY_MODEL_FILE).read_bytes() == tiny_source.read_bytes()
    device = os.stat(helper_mountpoint).st_dev
    with open(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb") as file:
        assert file.read().strip() == "128"
    unmount = subprocess.run(["umount", str(helper_mountpoint)], capture_output=True, text=True)
    assert unmount.returncode == 0, unmount.stderr
    assert wait_unmounted(helper_mountpoint)
    assert "is ready" in (tmp_path / "cache" / "daemon.log").read_text()


@needs_fuse
def test_fstab_line_mounts(helper_installed, helper_mountpoint, tiny_store, tiny_source, tmp_path):
    config = tmp_path / "models.toml"
    config.write_text(f'cache_dir = "{tmp_path / "cache"}"\nmemory_limit = "64MiB"\n')
    config.chmod(0o644)
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"# a test fstab\n{tiny_store} {helper_mountpoint} fuse.shardfs "
        f"ro,_netdev,nofail,config={config} 0 0\n"
    )
    result = subprocess.run(
        ["mount", "--fstab", str(fstab), str(helper_mountpoint)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (helper_mountpoint / TINY_MODEL_FILE).read_bytes() == tiny_source.read_bytes()
    assert (tmp_path / "cache" / "daemon.log").exists()
    unmount = subprocess.run(["umount", str(helper_mountpoint)], capture_output=True, text=True)
    assert unmount.returncode == 0, unmount.stderr
    assert wait_unmounted(helper_mountpoint)


def helper_command(store, mountpoint, options: str) -> list[str]:
    helper = os.path.join(SCRIPTS, "mount.fuse.shardfs")
    if not os.access(helper, os.X_OK):
        pytest.skip("mount.fuse.shardfs is not installed; run pip install -e .")
    return [helper, str(store), str(mountpoint), "-o", options]


def daemon_count(cache) -> int:
    """Return how many daemons logged "is ready" to the daemon log in *cache*."""
    return (cache / "daemon.log").read_text().count("is ready")


@needs_fuse
def test_helper_mount_twice_succeeds(helper_mountpoint, tiny_store, tmp_path):
    cache = tmp_path / "cache"
    command = helper_command(tiny_store, helper_mountpoint, f"ro,cache_dir={cache}")
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stderr == ""
    assert daemon_count(cache) == 1
    assert mount_type(helper_mountpoint) == "fuse.shardfs"


@needs_fuse
def test_helper_other_store_on_mountpoint_fails(helper_mountpoint, tiny_store, tmp_path):
    cache = tmp_path / "cache"
    first = subprocess.run(
        helper_command(tiny_store, helper_mountpoint, f"ro,cache_dir={cache}"),
        capture_output=True, text=True, timeout=120,
    )
    assert first.returncode == 0, first.stderr
    other = tmp_path / "other-store"
    shutil.copytree(tiny_store, other)
    second = subprocess.run(
        helper_command(other, helper_mountpoint, f"ro,cache_dir={tmp_path / 'cache2'}"),
        capture_output=True, text=True, timeout=120,
    )
    assert second.returncode == mount_helper.EXIT_USAGE
    assert f"mountpoint {str(helper_mountpoint)!r} is already a mount point" in second.stderr


@needs_fuse
def test_helper_replaces_stale_mount(helper_mountpoint, tiny_store, tiny_source, tmp_path):
    cache = tmp_path / "cache"
    command = helper_command(tiny_store, helper_mountpoint, f"ro,cache_dir={cache}")
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    pgrep = subprocess.run(
        ["pgrep", "-f", f"shardfs.*mount.*{helper_mountpoint}"], capture_output=True, text=True
    )
    (pid,) = [int(word) for word in pgrep.stdout.split()]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert daemon_count(cache) == 2
    assert (helper_mountpoint / TINY_MODEL_FILE).read_bytes() == tiny_source.read_bytes()


def proc_mounts_sources(path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        return [line.split()[0] for line in mounts if line.split()[1] == str(path)]


@needs_fuse
def test_fstab_mount_all_twice(helper_installed, helper_mountpoint, tiny_store, tmp_path):
    cache = tmp_path / "cache"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{tiny_store} {helper_mountpoint} fuse.shardfs ro,cache_dir={cache} 0 0\n")
    # A directory named shardfs, which mount(8) would take for a source
    # given as a relative path.
    (tmp_path / "shardfs").mkdir()
    for attempt in range(2):
        result = subprocess.run(
            ["mount", "-T", str(fstab), "-a"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
        assert result.returncode == 0, f"attempt {attempt}: {result.stderr}"
    assert proc_mounts_sources(helper_mountpoint) == [tiny_store]
    assert daemon_count(cache) == 1
    unmount = subprocess.run(["umount", str(helper_mountpoint)], capture_output=True, text=True)
    assert unmount.returncode == 0, unmount.stderr
    assert wait_unmounted(helper_mountpoint)


@needs_fuse
@pytest.mark.parametrize(
    "options, mention",
    [("ro,cache_size=big", "invalid option cache_size=big"),
     ("ro,bogus", "unknown option 'bogus' for a shardfs mount")],
    ids=["bad-value", "unknown-option"],
)
def test_mount_command_reports_helper_error(
    helper_installed, helper_mountpoint, tiny_store, options, mention
):
    result = subprocess.run(
        ["mount", "-t", "fuse.shardfs", tiny_store, str(helper_mountpoint), "-o", options],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert mention in lines[0]
    assert not os.path.ismount(helper_mountpoint)
