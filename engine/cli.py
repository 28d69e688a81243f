"""What a command-line entry point needs: one error class for user mistakes, and `run_cli`.

Every error that a wrong flag, file, row or adapter can cause derives from `UserError`
(ConfigError, LoadError, TokenizerError, AdapterError, MergeError, DataError,
DefaultModelError). `run_cli` prints those as one line and exits 2; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import os
import sys


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, exit code 2."""


def run_cli(main) -> None:
    """sys.exit(main()), with a UserError as `error: <message>` and exit code 2.

    LLAMA3_LORA_DEBUG=1 shows the traceback of a UserError too.
    """
    try:
        sys.exit(main())
    except UserError as e:
        if os.environ.get("LLAMA3_LORA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
