"""A store made of several member stores, each chunk kept on R of them.

Members are S3 buckets (on one endpoint or several) or local directories,
each with a weight. Every chunk is placed on the R members that rank first
for its key by weighted rendezvous hashing (`shardfs.stores.placement`).
So every host computes the same placement from the member list alone, and
adding or removing a member moves only the chunks whose placement changed.
Every other object (manifests, retired manifests) is kept on every member.

Reads go to the first usable member: for a chunk, in its rank order, so
the placement comes first; for anything else, in the order the members were
given. A member that fails or has not responded within ``hedge_after_s``
has the read started on the next member as well, and the first good response
wins. A member that fails ``failure_threshold`` times in a row is tried
last for ``unhealthy_s``, then probed with `check` in the background before
it is tried first again. Writes go to every member that should hold the
object, and fail if any of them fails.

Listings merge what every member lists, so a member that lost its objects
hides no model. The store never sees chunk contents: a reader that finds a
copy corrupt calls `PlacedStore.report_bad_copy`, and later reads of that
key try the member that served the copy only after every other member.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence

from shardfs.config import StoreConfig
from shardfs.errors import (
    ObjectInvalid,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
    UsageError,
)
from shardfs.stores.base import CHUNKS_PREFIX, ObjectInfo, Store, list_models
from shardfs.stores.placement import Placement

log = logging.getLogger(__name__)

DEFAULT_REPLICAS = 2
MEMBER_SYNTAX = "URL[,endpoint=http://HOST:PORT][,weight=N][,id=NAME]"
# Keys whose last serving member is remembered for `report_bad_copy`, and
# keys with a reported bad copy. A chunk source reports right after its
# get, so a few thousand recent keys cover every read in flight.
_REMEMBERED_KEYS = 4096
_REPEAT_LOG_INTERVAL_S = 60.0


@dataclasses.dataclass(frozen=True)
class MemberConfig:
    store: StoreConfig
    # Share of the chunks relative to the other members; 0 keeps the member
    # for reads but places no chunk on it, so `shardfs repair` drains it.
    weight: float = 1.0
    # Name that placement hashes; None uses the store URL. Two members with
    # one URL (one bucket name on two endpoints) need ids of their own.
    id: str | None = None


@dataclasses.dataclass(frozen=True)
class PlacedStoreConfig:
    members: tuple[MemberConfig, ...]
    replicas: int = DEFAULT_REPLICAS
    # Concurrent store requests of one process, as `StoreConfig.max_connections`.
    max_connections: int = 16
    # A read that has no response from a member after this long is started on
    # the next member too. One 8 MiB chunk takes 0.84 s at 10 MB/s, so 2 s
    # leaves a healthy member over a second for its first byte.
    hedge_after_s: float = 2.0
    # Consecutive failures (or reads that had to be started elsewhere) after
    # which a member is tried last, and for how long before it is probed.
    failure_threshold: int = 3
    unhealthy_s: float = 30.0

    @property
    def url(self) -> str:
        return ", ".join(member.store.url for member in self.members)


def member_id(member: MemberConfig) -> str:
    """Return the name that placement hashes for *member*.

    The endpoint is not part of it, so hosts that reach one bucket through
    different endpoints (or through ``AWS_ENDPOINT_URL``) place alike.
    """
    if member.id is not None:
        return member.id
    url = member.store.url
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        prefix = prefix.strip("/")
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if url.startswith("file://"):
        return os.path.normpath(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if "://" in url:
        return url
    return os.path.abspath(url)


def parse_member(text: str, default_endpoint: str | None, max_connections: int) -> MemberConfig:
    """Parse one ``--store`` value, ``URL[,endpoint=URL][,weight=N][,id=NAME]``.

    The URL may not contain a comma. *default_endpoint* (``--endpoint-url``)
    applies to an ``s3://`` member that names no endpoint of its own.
    """

    def invalid(reason: str) -> UsageError:
        return UsageError(f"invalid --store value {text!r}: {reason}; expected {MEMBER_SYNTAX}")

    url, *options = text.split(",")
    if not url:
        raise invalid("the URL is empty")
    values: dict[str, str] = {}
    for option in options:
        name, equals, value = option.partition("=")
        if not equals or not value:
            raise invalid(f"option {option!r} is not NAME=VALUE")
        if name not in ("endpoint", "weight", "id"):
            raise invalid(f"unknown option {name!r} (known: endpoint, weight, id)")
        if name in values:
            raise invalid(f"option {name!r} is given twice")
        values[name] = value

    endpoint = values.get("endpoint")
    if endpoint is not None:
        if not url.startswith("s3://"):
            raise invalid("endpoint= applies only to s3:// URLs")
        if not endpoint.startswith(("http://", "https://")):
            raise invalid(f"endpoint {endpoint!r} is not an http:// or https:// URL")
    elif url.startswith("s3://"):
        endpoint = default_endpoint

    weight = 1.0
    if "weight" in values:
        try:
            weight = float(values["weight"])
        except ValueError:
            weight = -1.0
        if not (math.isfinite(weight) and weight >= 0):
            raise invalid(f"weight {values['weight']!r} is not a number >= 0")

    store = StoreConfig(url=url, endpoint_url=endpoint, max_connections=max_connections)
    return MemberConfig(store, weight, values.get("id"))


def placed_config(
    members: Sequence[MemberConfig], replicas: int | None, max_connections: int
) -> PlacedStoreConfig:
    """Return the config of a store over *members*; raise `UsageError` if it cannot work.

    *replicas* None means `DEFAULT_REPLICAS`.
    """
    ids = [member_id(member) for member in members]
    seen: dict[str, str] = {}
    for member, name in zip(members, ids):
        if name in seen:
            raise UsageError(
                f"--store values {seen[name]!r} and {member.store.url!r} are the same "
                f"store {name!r}; give them distinct ids with id=NAME"
            )
        seen[name] = member.store.url
    if replicas is None:
        replicas = DEFAULT_REPLICAS
    positive = sum(member.weight > 0 for member in members)
    if not 1 <= replicas <= positive:
        raise UsageError(
            f"invalid --replicas {replicas}: expected 1 to {positive}, the number of "
            "--store values of positive weight"
        )
    return PlacedStoreConfig(tuple(members), replicas, max_connections)


class _Health:
    """Failure count and state of one member; safe to use from any thread."""

    def __init__(self, name: str, config: PlacedStoreConfig, clock: Callable[[], float]):
        self._name = name
        self._threshold = config.failure_threshold
        self._unhealthy_s = config.unhealthy_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        # None while healthy, else when the member may be probed.
        self._probe_at: float | None = None
        self._probing = False
        # When the member was last marked unhealthy at WARNING level.
        self._warned_at: float | None = None

    @property
    def unhealthy(self) -> bool:
        """Whether the member is marked unhealthy and so tried last."""
        with self._lock:
            return self._probe_at is not None

    def healthy(self, probe: Callable[[], None]) -> bool:
        """Return whether the member is healthy, and start *probe* in a thread when one is due."""
        with self._lock:
            if self._probe_at is None:
                return True
            if self._probing or self._clock() < self._probe_at:
                return False
            self._probing = True
        threading.Thread(
            target=self._run_probe, args=(probe,), name=f"probe {self._name}", daemon=True
        ).start()
        return False

    def _run_probe(self, probe: Callable[[], None]) -> None:
        try:
            probe()
        except StoreError as exc:
            with self._lock:
                self._probing = False
                self._probe_at = self._clock() + self._unhealthy_s
            log.info(
                "store member %s is still failing, next probe in %.0f s: %s",
                self._name,
                self._unhealthy_s,
                exc,
            )
            return
        with self._lock:
            self._probing = False
            self._failures = 0
            self._probe_at = None
        log.info("store member %s passed its probe and is tried first again", self._name)

    def succeeded(self) -> None:
        # An unhealthy member that serves a read stays unhealthy until its
        # probe passes, so one late response does not put it first again.
        with self._lock:
            self._failures = 0

    def failed(self, reason: object) -> None:
        with self._lock:
            self._failures += 1
            if self._probe_at is not None or self._failures < self._threshold:
                return
            now = self._clock()
            self._probe_at = now + self._unhealthy_s
            failures = self._failures
            # A member marked unhealthy again within a minute of its last
            # WARNING, after its probe passed, is logged at INFO.
            repeated = self._warned_at is not None and now - self._warned_at < _REPEAT_LOG_INTERVAL_S
            if not repeated:
                self._warned_at = now
        log.log(
            logging.INFO if repeated else logging.WARNING,
            "store member %s failed %d times in a row, trying it last for %.0f s "
            "and reading from the other members: %s",
            self._name,
            failures,
            self._unhealthy_s,
            reason,
        )


@dataclasses.dataclass(eq=False)
class Member:
    index: int
    id: str
    # The URL, with the endpoint and the id if they are set, for messages.
    name: str
    weight: float
    store: Store
    health: _Health


class PlacedStore:
    """The `Store` protocol over several members; safe to call from many threads."""

    def __init__(
        self,
        config: PlacedStoreConfig,
        stores: Sequence[Store],
        clock: Callable[[], float] = time.monotonic,
    ):
        if len(stores) != len(config.members):
            raise ValueError("expected one store per member")
        self.url = config.url
        self.replicas = config.replicas
        self._hedge_after_s = config.hedge_after_s
        ids = [member_id(member) for member in config.members]
        self.members: list[Member] = []
        for index, (member, store, identity) in enumerate(zip(config.members, stores, ids)):
            details = [member.store.endpoint_url] if member.store.endpoint_url else []
            if member.id is not None:
                details.append(f"id {member.id}")
            name = member.store.url
            if details:
                name = f"{name} ({', '.join(details)})"
            health = _Health(name, config, clock)
            self.members.append(Member(index, identity, name, member.weight, store, health))
        weights = [member.weight for member in config.members]
        self._placement = Placement(ids, weights, config.replicas)
        self._lock = threading.Lock()
        # Object key -> index of the member whose copy a get returned last.
        self._served_by: collections.OrderedDict[str, int] = collections.OrderedDict()
        # Object key -> indexes of members that served a corrupt copy of it.
        self._bad_copies: collections.OrderedDict[str, set[int]] = collections.OrderedDict()
        # (member index, action) -> when a warning about it was last logged.
        self._last_logged: dict[tuple[int, str], float] = {}
        # Reads served by a member other than the first in their rank: the
        # first failed, was slow, was marked unhealthy or lacked a good copy.
        self.failovers = 0

    # Placement.

    def rank(self, key: str) -> list[Member]:
        """Return every member, best first, for the chunk whose content key is *key*."""
        return [self.members[index] for index in self._placement.rank(key)]

    def unhealthy_members(self) -> int:
        """Return the number of members marked unhealthy, which reads try last."""
        return sum(member.health.unhealthy for member in self.members)

    def placement(self, key: str) -> list[Member]:
        """Return the members that should hold the chunk whose content key is *key*."""
        return self.rank(key)[: self.replicas]

    # Reads.

    def check(self) -> None:
        """Raise unless at least one member can be read; log the members that cannot."""
        self._run_on_every_member("check", lambda store: store.check())

    def get(self, key: str) -> bytes:
        return self._read(key, lambda store: store.get(key))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self._read(key, lambda store: store.get_range(key, start, end))

    def head(self, key: str) -> int | None:
        """Return the object's size; for a chunk, only if every member of its placement has it."""
        if _is_chunk(key):
            sizes = [member.store.head(key) for member in self.placement(_content_key(key))]
            return None if None in sizes else sizes[0]
        try:
            return self._read(key, lambda store: _present(store.head(key), key))
        except ObjectNotFound:
            return None

    def stat(self, key: str) -> ObjectInfo | None:
        """Return size and age of the object; for a chunk, of its youngest copy on any member."""
        if _is_chunk(key):
            infos = [member.store.stat(key) for member in self.members]
            found = [info for info in infos if info is not None]
            return max(found, key=lambda info: info.modified) if found else None
        try:
            return self._read(key, lambda store: _present(store.stat(key), key))
        except ObjectNotFound:
            return None

    def list_models_of_each_member(self) -> tuple[list[str], list[tuple[Member, StoreError]]]:
        """Check and list every member; return the models any of them lists, and the failures.

        Unlike `list`, which leaves a failing member out with a warning,
        this returns each member that failed its check or its listing with
        the error, for commands that must not pass over a member.
        """
        names: set[str] = set()
        failures: list[tuple[Member, StoreError]] = []
        for member in self.members:
            try:
                member.store.check()
                names.update(list_models(member.store))
            except StoreError as exc:
                failures.append((member, exc))
        return sorted(names), failures

    def list(self, prefix: str) -> Iterator[str]:
        for info in self.list_info(prefix):
            yield info.key

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield the objects under *prefix*, each key once with its youngest copy.

        The listings of all members are merged. For chunks every member must
        respond, so gc sees every copy. Other objects belong on every member,
        so members that fail or are slow are left out as long as one
        responds; merging still shows a model that a member lost.
        """
        if prefix.startswith(CHUNKS_PREFIX) or CHUNKS_PREFIX.startswith(prefix):
            listings = [list(member.store.list_info(prefix)) for member in self.members]
        else:
            listings = self._run_on_every_member(
                f"listing {prefix}", lambda store: list(store.list_info(prefix))
            )
        youngest: dict[str, ObjectInfo] = {}
        for listing in listings:
            for info in listing:
                known = youngest.get(info.key)
                if known is None or info.modified > known.modified:
                    youngest[info.key] = info
        yield from youngest.values()

    def report_bad_copy(self, key: str) -> bool:
        """Note that the last copy of *key* that `get` returned is corrupt.

        The next reads of *key* try that member only after every other one.
        Returns False when no member is known to have served *key* lately.
        """
        with self._lock:
            index = self._served_by.pop(key, None)
            if index is None:
                return False
            bad = self._bad_copies.setdefault(key, set())
            bad.add(index)
            self._bad_copies.move_to_end(key)
            while len(self._bad_copies) > _REMEMBERED_KEYS:
                self._bad_copies.popitem(last=False)
        log.warning(
            "store member %s returned a corrupt copy of %s; reading it from the other members",
            self.members[index].name,
            key,
        )
        return True

    # Writes.

    def put(self, key: str, data: bytes) -> None:
        """Write the object to every member that should hold it.

        A chunk member that already has a copy of the same size gets its
        copy's age renewed instead of a new upload. Every member is tried,
        then the first error is raised.
        """
        if _is_chunk(key):
            members = self.placement(_content_key(key))
            self._write_all(members, lambda store: _put_if_missing(store, key, data))
        else:
            self._write_all(self.members, lambda store: store.put(key, data))

    def touch(self, key: str) -> None:
        """Renew the object's age on every member that should hold it.

        Raises `ObjectNotFound` if any of them lacks it, after touching the rest.
        """
        members = self.placement(_content_key(key)) if _is_chunk(key) else self.members
        self._write_all(members, lambda store: store.touch(key))

    def delete(self, key: str) -> None:
        """Delete the object from every member, including copies outside its placement."""
        self._write_all(self.members, lambda store: store.delete(key))

    def remove_partial_writes(self, cutoff: float, dry_run: bool = False) -> tuple[int, int]:
        """Delete the leftovers of killed puts on every member that responds.

        A member that fails is logged and skipped, because the leftovers
        take space but are never read.
        """
        count = size = 0
        for member in self.members:
            try:
                removed, removed_bytes = member.store.remove_partial_writes(cutoff, dry_run)
            except StoreError as exc:
                log.warning("cannot remove partial writes on store member %s: %s", member.name, exc)
                continue
            count += removed
            size += removed_bytes
        return count, size

    def create(self) -> None:
        """Create the members that are local directories, as `LocalStore.create` does."""
        for member in self.members:
            create = getattr(member.store, "create", None)
            if create is not None:
                create()

    # Internals.

    def _run_on_every_member(self, action: str, operation: Callable[[Store], object]) -> list:
        """Run *operation* on every member at once; return the results of those that succeeded.

        After the first success, the others get the hedge delay to finish
        too, and those that fail or miss it are logged and left out.
        Raises when every member failed. *action* names the work in logs.
        """
        pending = {_start(member, operation): member for member in self.members}
        results: list = []
        errors: list[tuple[Member, StoreError]] = []
        deadline = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = concurrent.futures.wait(
                pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
            )
            if not done:
                break
            for future in done:
                member = pending.pop(future)
                try:
                    results.append(future.result())
                except StoreError as exc:
                    errors.append((member, exc))
                    continue
                if deadline is None:
                    deadline = time.monotonic() + self._hedge_after_s
        if not results:
            raise _combined_error(self.url, errors)
        for member, exc in errors:
            log.log(
                self._repeat_level(member, action),
                "%s without store member %s, which failed: %s",
                action,
                member.name,
                exc,
            )
        for member in pending.values():
            member.health.failed(f"no response within {self._hedge_after_s:g} s")
            log.log(
                self._repeat_level(member, action),
                "%s without store member %s, which did not respond within %g s",
                action,
                member.name,
                self._hedge_after_s,
            )
        return results

    def _repeat_level(self, member: Member, action: str) -> int:
        """Return WARNING at most once a minute per member and action, else DEBUG.

        The daemon lists the models every refresh interval, so a member
        that is down would otherwise log a warning each time.
        """
        now = time.monotonic()
        with self._lock:
            last = self._last_logged.get((member.index, action))
            if last is not None and now - last < _REPEAT_LOG_INTERVAL_S:
                return logging.DEBUG
            self._last_logged[(member.index, action)] = now
        return logging.WARNING

    def _write_all(self, members: Sequence[Member], operation: Callable[[Store], None]) -> None:
        first_error: StoreError | None = None
        for member in members:
            try:
                operation(member.store)
            except StoreError as exc:
                if first_error is None:
                    first_error = exc
        if first_error is not None:
            raise first_error

    def _ordered(self, ranked: Sequence[Member], key: str | None) -> list[Member]:
        """Return *ranked* with healthy members first and reported bad copies last."""
        with self._lock:
            bad = set(self._bad_copies.get(key, ())) if key is not None else set()
        healthy, failing, reported = [], [], []
        for member in ranked:
            if member.index in bad:
                reported.append(member)
            elif member.health.healthy(member.store.check):
                healthy.append(member)
            else:
                failing.append(member)
        return healthy + failing + reported

    def _read(self, key: str, operation: Callable[[Store], object]):
        ranked = self.rank(_content_key(key)) if _is_chunk(key) else self.members
        order = self._ordered(ranked, key)
        result, member = self._hedged(key, order, operation)
        with self._lock:
            if member is not ranked[0]:
                self.failovers += 1
            self._served_by[key] = member.index
            self._served_by.move_to_end(key)
            while len(self._served_by) > _REMEMBERED_KEYS:
                self._served_by.popitem(last=False)
        return result

    def _hedged(self, key: str, order: Sequence[Member], operation: Callable[[Store], object]):
        """Run *operation* on the members in *order* until one succeeds.

        The next member is started when the running ones have all failed,
        or when none has responded within the hedge delay. Returns the first
        result and the member that gave it. Raises `ObjectNotFound` when
        every member lacks the object, `ObjectInvalid` when the others lack
        it, the member's error when every member failed alike, and
        `StoreUnavailable` otherwise.
        """
        pending: dict[concurrent.futures.Future, Member] = {}
        # Requests already counted against their member for being slow.
        slow: set[concurrent.futures.Future] = set()
        errors: list[tuple[Member, StoreError]] = []
        position = 0

        def start_next() -> None:
            nonlocal position
            member = order[position]
            position += 1
            pending[_start(member, operation)] = member

        start_next()
        while pending:
            can_hedge = position < len(order)
            done, _ = concurrent.futures.wait(
                pending,
                timeout=self._hedge_after_s if can_hedge else None,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )
            if not done:
                for future, member in pending.items():
                    if future not in slow:
                        slow.add(future)
                        member.health.failed(f"no response within {self._hedge_after_s:g} s")
                start_next()
                continue
            for future in done:
                member = pending.pop(future)
                try:
                    return future.result(), member
                except ObjectNotFound:
                    pass
                except StoreError as exc:
                    errors.append((member, exc))
            if not pending and position < len(order):
                start_next()
        if not errors:
            raise ObjectNotFound(key)
        if len(errors) == len(order):
            raise _combined_error(self.url, errors)
        # Every member responded: the object is missing or damaged on each,
        # which waiting for them does not change.
        if all(isinstance(exc, ObjectInvalid) for _, exc in errors):
            raise errors[0][1]
        raise StoreUnavailable(self.url, _describe(errors))


def describe_member_failures(failures: Sequence[tuple[Member, StoreError]]) -> str:
    """Return one line that names each member in *failures* and its error."""
    if len(failures) == 1:
        member, exc = failures[0]
        return f"store member {member.name} failed: {exc}"
    return "store members failed: " + _describe(failures)


def _start(member: Member, operation: Callable[[Store], object]) -> concurrent.futures.Future:
    """Run *operation* on *member* in a daemon thread, recording its health.

    Daemon threads, so a request hung on a dead member never delays the
    process's exit; the store client's own timeouts end it.
    """
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            result = operation(member.store)
        except (ObjectNotFound, ObjectInvalid) as exc:
            # The member responded: the object is missing or damaged there.
            member.health.succeeded()
            future.set_exception(exc)
        except StoreError as exc:
            member.health.failed(exc)
            future.set_exception(exc)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            member.health.succeeded()
            future.set_result(result)

    threading.Thread(target=run, name=f"read {member.name}", daemon=True).start()
    return future


def _is_chunk(key: str) -> bool:
    return key.startswith(CHUNKS_PREFIX)


def _content_key(object_key: str) -> str:
    """Return the content key of the chunk stored at *object_key*."""
    return object_key.rsplit("/", 1)[-1]


def _present(value, key: str):
    if value is None:
        raise ObjectNotFound(key)
    return value


def _put_if_missing(store: Store, key: str, data: bytes) -> None:
    """Upload a chunk unless *store* has a copy of the same size, whose age is renewed."""
    if store.head(key) == len(data):
        try:
            store.touch(key)
            return
        except ObjectNotFound:
            # Deleted (by gc) since the head: upload it after all.
            pass
    store.put(key, data)


def _describe(errors: Sequence[tuple[Member, StoreError]]) -> str:
    return "; ".join(f"{member.name}: {exc}" for member, exc in errors)


def _combined_error(url: str, errors: Sequence[tuple[Member, StoreError]]) -> StoreError:
    """Return the error for members that all failed.

    That is the member's own error when there is one member, or when all
    failed alike with an error that retrying does not fix (no bucket,
    access denied), so callers treat it as they would for one store.
    """
    first = errors[0][1]
    alike = all(type(exc) is type(first) for _, exc in errors)
    if len(errors) == 1 or (alike and not isinstance(first, StoreUnavailable)):
        return first
    return StoreUnavailable(url, _describe(errors))
