"""``shardfs ls``: list the models in a store."""

import sys

from shardfs.commands import add_store_options, store_config
from shardfs.config import format_count, format_size
from shardfs.errors import ManifestInvalid, ObjectInvalid, ObjectNotFound, StoreError
from shardfs.manifest import parse_manifest
from shardfs.mount.listing import valid_member_copy
from shardfs.stores import PlacedStore, list_models, open_store
from shardfs.stores.base import manifest_object_key
from shardfs.stores.placed import describe_member_failures


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ls",
        help="list the models in a store; with several --store members, exit 1 if "
        "any member cannot be listed",
    )
    add_store_options(parser, positional=True)
    parser.set_defaults(run=run)


def run(args) -> int:
    store = open_store(store_config(args))
    failures = []
    if isinstance(store, PlacedStore):
        names, failures = store.list_models_of_each_member()
        if len(failures) == len(store.members):
            raise StoreError(describe_member_failures(failures))
    else:
        store.check()
        names = list_models(store)
    status = 0
    for name in names:
        try:
            data = store.get(manifest_object_key(name))
            if isinstance(store, PlacedStore):
                data = valid_member_copy(store, name, data)
            manifest = parse_manifest(name, data)
        except ObjectNotFound:
            continue
        except (ManifestInvalid, ObjectInvalid) as exc:
            print(f"{name}\tinvalid: {exc.reason}")
            status = 1
            continue
        stored = manifest.stored_size
        print(
            f"{name}\t{format_count(len(manifest.files), 'file')}\t{format_size(manifest.size)}"
            f"\t{format_size(stored)} stored"
        )
    # Models stored only on a failed member are missing from the listing above.
    for member, exc in failures:
        print(f"shardfs: error: store member {member.name} failed: {exc}", file=sys.stderr)
        status = 1
    return status
