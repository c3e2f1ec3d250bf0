"""``shardfs status``: what the daemon of a mount is doing."""

from shardfs import control_protocol
from shardfs.config import format_count, format_size


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("status", help="show the figures of a running mount")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    import json

    (reply,) = list(control_protocol.request(args.mountpoint, {"op": "status"}))
    if args.json:
        print(json.dumps(reply, indent=1, sort_keys=True))
        return 0
    print(f"mount          {reply['mountpoint']}")
    print(f"models         {reply['models']}")
    print(f"served         {format_size(reply['bytes_read'])} in "
          f"{format_count(reply['reads'], 'read')}, {reply['read_errors']} failed")
    in_flight = f"{reply['fetches_in_flight']} in flight"
    # A daemon started by an older shardfs does not report abandoned requests.
    if reply.get("abandoned_in_flight"):
        in_flight += f" and {reply['abandoned_in_flight']} abandoned"
    print(f"fetched        {format_size(reply['bytes_fetched'])} in "
          f"{format_count(reply['chunks_fetched'], 'request')}, {in_flight}, "
          f"{format_count(reply['retries'], 'retry', 'retries')}")
    if "store_members" in reply:
        healthy = reply["store_members"] - reply["unhealthy_members"]
        print(f"members        {healthy} of {reply['store_members']} healthy, "
              f"{format_count(reply['store_failovers'], 'read')} served by another member")
    print(f"cache          {format_size(reply['disk_cache_bytes'])} of "
          f"{format_size(reply['disk_cache_limit_bytes'])} on disk, "
          f"{format_size(reply['memory_bytes'])} in memory, "
          f"hit ratio {reply['cache_hit_ratio']:.2f}")
    for model in reply["model_list"]:
        share = model["cached"] / model["size"] if model["size"] else 1.0
        files = format_count(model["files"], "file")
        print(f"  {model['name']}\t{files}\t{format_size(model['size'])}\t{share:.0%} cached")
    return 0
