"""``thinet-fast``: prune, inspect, report, fine-tune, study, demo. Calls only the public
API; bad options are one line and exit status 2, before any model or image is loaded."""
from __future__ import annotations

import argparse
import sys

import thinet_fast as tf

from .loading import CLIError, load_data, load_model, read_config
from .parser import build_parser

__all__ = ["main", "build_parser", "load_model", "load_data", "CLIError"]


def _with_config(ap: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--config FILE``: its values become the subcommand's defaults (the command line
    still wins), so a required option may come from the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    command = next((t for t in argv if t in subs.choices), None)
    if command is None:
        return
    sub = subs.choices[command]
    values = read_config(known.config)
    dests = {a.dest: a for a in sub._actions}
    unknown = sorted(set(values) - set(dests) - {"config"})
    if unknown:
        raise CLIError(f"--config {known.config!r}: unknown option(s) {unknown} for `{command}`")
    for dest, v in values.items():
        if dest in dests:
            dests[dest].required = False
    sub.set_defaults(**{k: v for k, v in values.items() if k != "config"})


def _interrupted(args) -> str:
    if getattr(args, "command", None) == "prune":
        if getattr(args, "resume", None):
            return f"interrupted: rerun the same command; it resumes from {args.resume}"
        return "interrupted: nothing was saved; add --resume FILE to make a long prune resumable"
    if getattr(args, "command", None) == "finetune" and getattr(args, "checkpoint_dir", None):
        return "interrupted: rerun the same command with --resume to continue from the last checkpoint"
    return "interrupted"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = None
    try:
        _with_config(ap, argv)
        try:
            args = ap.parse_args(argv)
        except SystemExit as exc:  # argparse printed the usage and the error
            if exc.code in (0, None):
                raise
            return int(exc.code)
        args.fn(args)
    except KeyboardInterrupt:
        print(f"\n{_interrupted(args)}", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, KeyError,
            tf.BackendUnavailable) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
