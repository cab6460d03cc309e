"""`moetrain` command line: one module per subcommand, each on an argparse subparser.

A command module has ``SUMMARY`` (its line in ``moetrain --help``) and either ``configure(parser)`` to add
its arguments plus ``run(args) -> int``, or ``main(argv) -> int`` for a command that parses its own
arguments (lm-eval's command line). Modules import their dependencies inside these
functions, so ``moetrain --help`` loads no torch.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import time
from types import ModuleType

# command -> module in moetrain.cli, in the order `moetrain --help` lists them
COMMANDS = {
    "train": "train",
    "prepare-data": "prepare_data",
    "generate": "generate",
    "plot": "plot",
    "eval": "eval",
    "lm-eval": "lm_eval",
    "export": "export",
    "import": "import_",
    "upcycle": "upcycle",
    "consolidate": "consolidate",
}


def command_module(command: str) -> ModuleType:
    return importlib.import_module(f"moetrain.cli.{COMMANDS[command]}")


def _command_list() -> str:
    width = max(map(len, COMMANDS)) + 3
    lines = [f"  {name.ljust(width)}{command_module(name).SUMMARY}" for name in COMMANDS]
    return "commands:\n" + "\n".join(lines)


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """`moetrain`'s parser and its subparsers; only `command`'s subparser gets its arguments (adding the others
    would import what their commands need). The parser's help lists every command with its SUMMARY."""
    parser = argparse.ArgumentParser(prog="moetrain", usage="%(prog)s COMMAND [options]", add_help=False,
                                     description=_command_list(), formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="`moetrain COMMAND --help` lists a command's options.")
    subparsers = parser.add_subparsers(help=argparse.SUPPRESS)
    for name in COMMANDS:
        module = command_module(name)
        subparser = subparsers.add_parser(name, prog=f"moetrain {name}", add_help=hasattr(module, "configure"))
        if name == command and hasattr(module, "configure"):
            module.configure(subparser)
    return parser, subparsers.choices


def run(command: str, argv: list[str]) -> int:
    """Parse `argv` for one command and run it; bad input raises (ValueError, ...) for main() to report."""
    module = command_module(command)
    if not hasattr(module, "configure"):
        return module.main(argv)
    _, subparsers = build_parser(command)
    return module.run(subparsers[command].parse_args(argv))


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (nan, inf and negatives are refused naming the flag)."""
    value = float(text)
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _without_launcher_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher runs ``moetrain --local_rank=N train ...``: drop that leading flag (the LOCAL_RANK it
    also sets picks the device)."""
    if argv and argv[0].startswith(("--local_rank=", "--local-rank=")):
        return argv[1:]
    return argv


def main(argv: list[str] | None = None) -> None:
    argv = _without_launcher_rank(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        build_parser()[0].print_help()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmoetrain: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    from moetrain.checkpoint import CheckpointError
    from moetrain.train.trainer import TrainingDiverged

    try:
        code = run(argv[0], argv[1:])
    except (ValueError, FileNotFoundError, CheckpointError, TrainingDiverged) as error:
        # Bad input: one clear line, not a traceback (ConfigError, DataError, CheckpointError ...).
        sys.exit(report_error(f"moetrain {argv[0]}: error: {error}"))
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        sys.exit(report_error(f"moetrain {argv[0]}: error: {error.strerror}{where}; free disk space (a checkpoint "
                              f"run resumes with --load)"))
    sys.exit(code)


# rank 0 exits after the launcher's other workers (waiting at most this long), so the launcher records its
# failure alone; then a little longer than the launcher's poll of its workers (torchrun: every 0.1 s)
_OTHERS_EXIT_WAIT_S = 10.0
_LAUNCHER_POLL_S = 0.2


def report_error(message: str) -> int:
    """Print a bad-input error and return the exit code; under a launcher (torchrun, deepspeed), once.

    Before the processes have joined one job every rank read the same flags and met the same error, so
    rank 0 alone reports it (also in torchrun's error file, which its failure summary shows) and exits 1
    last; the other ranks leave quietly with 0, so the launcher's summary lists one failure. After joining,
    an error may be one rank's own: each rank reports its own, marked with its rank.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    distributed = sys.modules.get("torch.distributed")
    if world > 1 and distributed is not None and distributed.is_available() and distributed.is_initialized():
        print(f"[rank {rank}] {message}", file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    print(message, file=sys.stderr)
    if world > 1:
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            with open(error_file, "w") as f:
                json.dump({"message": {"message": message, "extraInfo": {
                    "py_callstack": message, "timestamp": str(int(time.time()))}}}, f)
        _wait_for_sibling_workers(_OTHERS_EXIT_WAIT_S)
    return 1


def _wait_for_sibling_workers(timeout: float) -> None:
    """Return once the launcher's other workers on this node (the other children of this process's parent)
    have exited, or after `timeout`; a fixed second where /proc cannot tell (not Linux). A fixed delay
    alone lost the race when a loaded machine started a rank more than that late."""
    if timeout <= 0:
        return
    deadline = time.monotonic() + timeout
    siblings = _live_siblings()
    if siblings is None:
        time.sleep(min(timeout, 1.0))
        return
    while siblings and time.monotonic() < deadline:
        time.sleep(0.05)
        siblings = _live_siblings()
    time.sleep(_LAUNCHER_POLL_S)


def _live_siblings() -> set[int] | None:
    """Running processes with this process's parent, other than this one (exited ones, zombies until the
    launcher reaps them, do not count); None where /proc is not readable."""
    parent, me = os.getppid(), os.getpid()
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    live = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]  # after "pid (name)": state, ppid
        except (OSError, ValueError):
            continue  # gone meanwhile
        if pid != me and int(ppid) == parent and state != "Z":
            live.add(pid)
    return live
