"""``python -m pyquant`` / ``pyquant``: env (more subcommands come with later work)."""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyquant", description="pyquant command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env", help="report the live backends")
    p_env.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.command == "env":
        from .env import env, format_env

        info = env()
        print(json.dumps(info, indent=2) if args.json else format_env(info))
    return 0
