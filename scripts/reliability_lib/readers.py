"""Reads of mounted files for the reliability runs, and how their outcomes read.

Each ``describe_*`` function returns a phrase for the report and whether
the outcome keeps the promise: the file's exact bytes, or EIO.
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

from fault_harness import Sources, file_sha256, read_source, timed_pread

CHILD_TIMEOUT_S = 180.0


def run_script(script: str, *arguments: str) -> tuple[int, str, str, float]:
    """Run *script* in a child Python and return its status, stdout, stderr and seconds."""
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, *arguments],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return -1, "", f"timed out after {CHILD_TIMEOUT_S:.0f} s", time.monotonic() - started
    return result.returncode, result.stdout, result.stderr, time.monotonic() - started


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def read_whole(path: str) -> tuple[str | OSError, float]:
    """Read *path* from a dropped page cache.

    Returns its sha256 or the error, and the seconds the read took.
    """
    started = time.monotonic()
    try:
        with open(path, "rb", buffering=0) as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        return exc, time.monotonic() - started
    return digest, time.monotonic() - started


def read_chunks_at_once(path: str, chunks) -> dict[str, tuple[bytes | OSError, float]]:
    """Pread each of *chunks* in its own thread, all at once, and return the results by key."""
    results = {}

    def read(chunk) -> None:
        results[chunk.key] = timed_pread(path, chunk.offset, chunk.length)

    threads = [threading.Thread(target=read, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def describe_error(error: OSError) -> str:
    """Return the errno name of *error*, such as ``EIO``, or its text if it has none."""
    if error.errno is None:
        return str(error)
    return errno.errorcode.get(error.errno, os.strerror(error.errno))


def describe_whole_read(
    outcome: tuple[str | OSError, float], source: str, label: str
) -> tuple[str, bool]:
    """Describe a `read_whole` *outcome*, compared with the *source* file."""
    result, seconds = outcome
    if isinstance(result, OSError):
        ok = result.errno == errno.EIO
        return f"{label}: {describe_error(result)} after {seconds:.1f} s", ok
    if result != file_sha256(source):
        return f"{label}: WRONG BYTES (sha256 differs)", False
    return f"{label}: exact bytes in {seconds:.1f} s", True


def describe_load(
    outcome: tuple[int, str, str, float], sources: Sources
) -> tuple[str, bool]:
    """Describe a run of LOAD_SCRIPT, compared with the tensors of *sources*."""
    status, stdout, stderr, seconds = outcome
    if status != 0:
        return f"loaders failed after {seconds:.1f} s: {last_line(stderr)[:160]}", False
    loaded = json.loads(stdout)
    wrong = [
        f"{kind}:{name}"
        for kind, tensors in sources.expected_tensors.items()
        for name, described in tensors.items()
        if loaded.get(kind, {}).get(name) != described
    ]
    if wrong:
        return f"WRONG TENSORS: {', '.join(wrong)}", False
    count = sum(len(tensors) for tensors in sources.expected_tensors.values())
    return f"torch.load and safetensors: all {count} tensors exact in {seconds:.1f} s", True


def describe_chunk_reads(results: dict, chunks, source: str) -> tuple[str, bool]:
    """Describe `read_chunks_at_once` *results*: counts of exact, wrong and failed reads."""
    outcomes = []
    ok = True
    for chunk in chunks:
        result, seconds = results[chunk.key]
        if isinstance(result, OSError):
            outcomes.append(f"{describe_error(result)} after {seconds:.1f} s")
            ok = ok and result.errno == errno.EIO
        elif result == read_source(source, chunk.offset, chunk.length):
            outcomes.append("exact")
        else:
            outcomes.append("WRONG BYTES")
            ok = False
    counts = {outcome: outcomes.count(outcome) for outcome in dict.fromkeys(outcomes)}
    return ", ".join(f"{count}x {outcome}" for outcome, count in counts.items()), ok


def describe_stat(path: str) -> tuple[str, int | None]:
    """Stat *path* and return a phrase and the errno, None when stat worked."""
    try:
        os.stat(path)
    except OSError as exc:
        return f"stat: {describe_error(exc)}", exc.errno
    return "stat works", None
