"""What a command-line entry point needs: one error class for user mistakes, and `cli_entry`.

Every error that a wrong flag, file, row or adapter can cause derives from `UserError`; the
subclasses live beside the code that raises them (model/config.py ConfigError, model/load.py
LoadError, model/tokenizer.py TokenizerError and TokenizerFileNotFound, model/default.py
DefaultModelError, data/read.py DataError, lora/io.py AdapterError, lora/merge.py MergeError,
kernels/__init__.py KernelsError). `cli_entry` prints those as one line and exits 2; anything
else is a bug and keeps its traceback.

This file and common/files.py are the ground floor: they import nothing of this project.
"""
from __future__ import annotations

import os
import sys


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, exit code 2."""


def cli_entry(main) -> None:
    """sys.exit(main()), with a UserError as `error: <message>` and exit code 2, and a Ctrl-C that
    reaches it (the second one, in train.py) as one line and exit code 130, the shell's.

    LLAMA3_LORA_DEBUG=1 shows the traceback of a UserError (or of a Ctrl-C) too.
    """
    try:
        sys.exit(main())
    except UserError as e:
        if os.environ.get("LLAMA3_LORA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("LLAMA3_LORA_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
