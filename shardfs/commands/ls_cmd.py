"""``shardfs ls``: list the models in a store."""

from shardfs.commands import add_store_options, store_config
from shardfs.config import format_count, format_size
from shardfs.errors import ManifestInvalid, ObjectNotFound
from shardfs.manifest import parse_manifest
from shardfs.stores import list_models, open_store
from shardfs.stores.base import manifest_object_key


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ls", help="list the models in a store")
    add_store_options(parser, positional=True)
    parser.set_defaults(run=run)


def run(args) -> int:
    store = open_store(store_config(args))
    store.check()
    status = 0
    for name in list_models(store):
        try:
            manifest = parse_manifest(name, store.get(manifest_object_key(name)))
        except ObjectNotFound:
            continue
        except ManifestInvalid as exc:
            print(f"{name}\tinvalid: {exc.reason}")
            status = 1
            continue
        stored = sum(entry.stored_size for entry in manifest.files)
        print(
            f"{name}\t{format_count(len(manifest.files), 'file')}\t{format_size(manifest.size)}"
            f"\t{format_size(stored)} stored"
        )
    return status
