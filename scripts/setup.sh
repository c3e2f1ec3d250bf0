#!/bin/sh
# Install what shardfs needs on a Debian host, as root, into ./.venv:
# the FUSE 3 library and tools, a C compiler, then the package with its
# test extras.
set -eu
cd "$(dirname "$0")/.."

# gcc and the Python headers build pyfuse3 and shardfs's compiled decoder.
packages="fuse3 libfuse3-dev pkg-config gcc"
# Tests of the service check the unit files with systemd-analyze and
# trace the mount helper with strace.
command -v strace >/dev/null || packages="$packages strace"
command -v systemd-analyze >/dev/null || packages="$packages systemd"
if ! python3 -m venv --help >/dev/null 2>&1; then
    packages="$packages python3-venv"
fi
if ! python3 -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' 2>/dev/null; then
    packages="$packages python3-dev"
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q $packages >/dev/null; then
    apt-get update -q >/dev/null
    apt-get install -y -q $packages >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The test extras pin torch to 2.13.0, a CPU build that the local package
# index carries; an unpinned torch would pull a CUDA build of several GB.
.venv/bin/pip install -q -e '.[test]'
