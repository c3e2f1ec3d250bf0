"""The store that ``--store`` values (or the config file's ``stores``) name.

One value is a plain store, as STORE is; two or more are the members of a
placed store. Every command builds its store through `store_from_values`,
so they accept and reject the same values with the same messages.
"""

import os
import urllib.parse
from collections.abc import Sequence

from shardfs.config import StoreConfig, format_count
from shardfs.errors import UsageError
from shardfs.stores.placed import (
    DEFAULT_REPLICAS,
    MemberConfig,
    PlacedStoreConfig,
    member_id,
    parse_member,
    placed_config,
)

# The reason that a store that is not placed rejects replicas above 1.
SINGLE_STORE_REPLICAS = (
    "a single store keeps one copy of each chunk; give two or more member stores "
    "as --store (or as stores in the config file) to keep more"
)


class _Wording:
    """Names of the store settings in messages: command-line flags or config file keys."""

    def __init__(self, members_file: str | None, replicas_file: str | None):
        self.members_file = members_file
        self.replicas_file = replicas_file

    def values(self, first: str, second: str) -> str:
        if self.members_file is None:
            return f"--store values {first!r} and {second!r}"
        return f"stores entries {first!r} and {second!r} in {self.members_file}"

    def none_positive(self) -> str:
        if self.members_file is None:
            return "no --store value has a positive weight"
        return f"no stores entry in {self.members_file} has a positive weight"

    def positive_count(self, count: int) -> str:
        """Return "there is 1 --store value with a positive weight", or as many as *count*."""
        verb = "is" if count == 1 else "are"
        if self.members_file is None:
            counted = format_count(count, "--store value")
        else:
            counted = f"{format_count(count, 'entry', 'entries')} of stores in {self.members_file}"
        return f"there {verb} {counted} with a positive weight"

    def replicas(self, value: int) -> str:
        if self.replicas_file is None:
            return f"--replicas {value}"
        return f"replicas = {value} in {self.replicas_file}"

    def set_replicas(self, value: int) -> str:
        if self.members_file is None:
            return f"give --replicas {value}"
        return f"set replicas = {value} in {self.members_file}"


def store_from_values(
    values: Sequence[str],
    replicas: int | None,
    endpoint_url: str | None,
    max_connections: int,
    *,
    members_file: str | None = None,
    replicas_file: str | None = None,
) -> StoreConfig | PlacedStoreConfig:
    """Return the store that *values* name, or raise `UsageError` if it cannot work.

    *replicas* None means the default. *members_file* and *replicas_file*
    name the config file that *values* and *replicas* come from, for
    messages; None means the command line. A single value's weight and id
    are accepted and unused.
    """
    wording = _Wording(members_file, replicas_file)
    if len(values) == 1:
        if replicas is not None and replicas != 1:
            raise UsageError(
                f"invalid {wording.replicas(replicas)}: {SINGLE_STORE_REPLICAS}"
            )
        return parse_member(values[0], endpoint_url, max_connections).store
    members = [parse_member(value, endpoint_url, max_connections) for value in values]
    # placed_config checks some of these rules too. These checks run first,
    # so the messages name the settings as the user gave them.
    _check_distinct(members, values, wording)
    _check_replicas(members, replicas, wording)
    return placed_config(members, replicas, max_connections)


def _store_location(member: MemberConfig) -> tuple[str, str | None]:
    """Return what identifies the store behind *member*, whatever its id option.

    That is the bucket and prefix with the endpoint for S3, and the real
    path for a local directory.
    """
    url = member.store.url
    if url.startswith("s3://"):
        return member_id(MemberConfig(member.store)), member.store.endpoint_url
    if url.startswith("file://"):
        url = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    return os.path.realpath(url), None


def _check_distinct(
    members: Sequence[MemberConfig], values: Sequence[str], wording: _Wording
) -> None:
    """Reject a store listed twice, and two stores that placement cannot tell apart.

    *values* are the members as written, for messages.
    """
    locations: dict[tuple[str, str | None], str] = {}
    ids: dict[str, str] = {}
    for member, value in zip(members, values):
        location = _store_location(member)
        if location in locations:
            raise UsageError(
                f"{wording.values(locations[location], value)} are the same store listed "
                "twice; list each store once"
            )
        locations[location] = value
        identity = member_id(member)
        if identity in ids:
            raise UsageError(
                f"{wording.values(ids[identity], value)} are different stores with the same "
                f"placement id {identity!r}; give them distinct ids with id=NAME"
            )
        ids[identity] = value


def _check_replicas(
    members: Sequence[MemberConfig], replicas: int | None, wording: _Wording
) -> None:
    positive = sum(member.weight > 0 for member in members)
    if positive == 0:
        raise UsageError(
            f"{wording.none_positive()}, so no chunk can be placed; give at least one "
            "a weight above 0"
        )
    if replicas is None:
        if positive < DEFAULT_REPLICAS:
            raise UsageError(
                f"the default of {DEFAULT_REPLICAS} replicas needs at least "
                f"{DEFAULT_REPLICAS} members with a positive weight, but "
                f"{wording.positive_count(positive)}; {wording.set_replicas(positive)} "
                "or give more members a weight above 0"
            )
        return
    if replicas < 1:
        raise UsageError(f"invalid {wording.replicas(replicas)}: expected at least 1")
    if replicas > positive:
        raise UsageError(
            f"invalid {wording.replicas(replicas)}: expected 1 to {positive}, because "
            f"{wording.positive_count(positive)}"
        )
