"""The ``shardfs`` command: parse arguments, dispatch, print one-line errors.

Exit status: 0 on success, 1 when a store request or a read failed, 2 for
invalid arguments or local preconditions, 130 when interrupted, and 143
when a command that writes to a store gets SIGTERM.
"""

import argparse
import sys

from shardfs import __version__
from shardfs.commands import (
    gc_cmd,
    ls_cmd,
    mount_cmd,
    push_cmd,
    repair_cmd,
    rm_cmd,
    status_cmd,
    verify_cmd,
    warm_cmd,
)
from shardfs.commands.entry_point import (
    configure_logging,
    raise_on_sigterm,
    run_with_exit_status,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Commands that write to a store: on SIGTERM they let the writes in
# progress finish, as on Ctrl-C. The mount daemon handles SIGTERM itself.
STORE_WRITERS = ("push", "repair", "gc", "rm")

COMMANDS = (
    push_cmd,
    mount_cmd,
    ls_cmd,
    status_cmd,
    warm_cmd,
    verify_cmd,
    repair_cmd,
    gc_cmd,
    rm_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardfs",
        description="Serve model files from a chunk store as a read-only filesystem.",
    )
    parser.add_argument("--version", action="version", version=f"shardfs {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="messages to print on stderr (default: WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(subparsers)
    for command_parser in subparsers.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse *argv*, and exit with the command's own usage for an argument it does not take.

    argparse leaves such arguments to the top-level parser, whose usage
    does not show the command's options.
    """
    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    # argparse takes positionals in one run, so in `verify STORE --check-files
    # NAME` it leaves NAME over. The command's own arguments are parsed again
    # with options and positionals mixed; what is still left is an error.
    words = list(sys.argv[1:] if argv is None else argv)
    command_words = words[words.index(args.command) + 1 :]
    command_parser = args.command_parser
    # Only the options before the command are kept: argparse warns about a
    # namespace that already has the command's positionals.
    positionals = {action.dest for action in command_parser._actions if not action.option_strings}
    namespace = argparse.Namespace(
        **{name: value for name, value in vars(args).items() if name not in positionals}
    )
    return command_parser.parse_intermixed_args(command_words, namespace=namespace)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    configure_logging(args.log_level)
    if args.command in STORE_WRITERS:
        raise_on_sigterm()
    return run_with_exit_status(
        lambda: args.run(args),
        exit_usage=EXIT_USAGE,
        exit_failed=EXIT_FAILED,
        exit_interrupted=EXIT_INTERRUPTED,
    )
