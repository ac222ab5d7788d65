"""`python -m medlora.safety {redact,screen,build-model} ...`: the safety layer's command line."""

from __future__ import annotations

import sys
from importlib import import_module

from medlora import cli  # noqa: F401 - sets the project root and quiets import noise, as for train.py

# Each command's module is imported only when that command runs, so one command's dependencies (or a
# module still being written) never stop the other from working.
COMMANDS = {
    "redact": ("medlora.safety.redact_cli", "remove PHI/PII from text before it is stored or trained on"),
    "screen": ("medlora.safety.screen_cli", "triage prompts: emergency, crisis, refuse or allow"),
    "build-model": ("medlora.safety.build_model_cli", "train the triage model and ship its adapter"),
}
USAGE = (
    "usage: python -m medlora.safety {redact,screen,build-model} [options]\n\ncommands:\n"
    + "".join(f"  {name:<13}{summary}\n" for name, (_, summary) in COMMANDS.items())
    + "\nRun `python -m medlora.safety COMMAND --help` for a command's options."
)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not args or args[0] not in COMMANDS:
        problem = "no command given" if not args else f"unknown command {args[0]!r}"
        print(f"error: {problem}\n{USAGE}", file=sys.stderr)
        return 2
    module_name = COMMANDS[args[0]][0]
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(
            f"error: the {args[0]!r} command is not available: {module_name} is missing from this install.",
            file=sys.stderr,
        )
        return 2
    return module.main(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
