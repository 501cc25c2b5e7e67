"""What every command line (train.py, eval.py, export.py, python -m siglip_jax.inference.search, tools/*.py) does
with an error: the project's own errors become one readable line on stderr and exit status 1.

The rule: an exception of a type in USER_ERRORS carries a message written for the person at the keyboard
(our code raises ValueError/TypeError for bad values and configs, FileNotFoundError, FileExistsError,
PermissionError and other OSErrors for paths, FloatingPointError for a run that diverged; the OS's own
OSErrors name the file), so its traceback is
noise. Any other exception is a bug and keeps its traceback. `-v` (or --verbose) on the command line, or
SIGLIP_TRACEBACK=1 in the environment, shows the traceback of every error.

    if __name__ == "__main__":
        cli.run_absl(main)   # absl CLIs; also checks --config.<key> overrides against the schema
        cli.run(main)        # argparse CLIs
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

from siglip_jax import config as config_lib
from siglip_jax.runtime import storage

# FloatingPointError: a diverged run or a damaged checkpoint (training.hooks, training.safeguards), said in words.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)
TRACEBACK_FLAGS = ("-v", "--verbose")
TRACEBACK_ENV = "SIGLIP_TRACEBACK"


def _wants_traceback(argv: list[str]) -> bool:
    """True when asked for tracebacks; removes a bare -v/--verbose from `argv` (absl's `-v N`, the log
    verbosity, is left alone)."""
    wanted = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    for index in range(len(argv) - 1, 0, -1):
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if argv[index] in TRACEBACK_FLAGS and not following.lstrip("-").isdigit():
            del argv[index]
            wanted = True
    return wanted


def _one_line(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    return f"error: {message} (-v or {TRACEBACK_ENV}=1 shows the traceback)"


def guarded(fn: Callable[..., Any], show_traceback: bool,
            errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Callable[..., Any]:
    """`fn` with `errors` turned into one line on stderr and exit status 1 (unless `show_traceback`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors as error:
            if show_traceback:
                raise
            print(_one_line(error), file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper


def _config_override_names(argv: list[str]) -> list[str]:
    names = []
    for argument in argv[1:]:
        for prefix in ("--config.", "--noconfig."):
            if argument.startswith(prefix):
                names.append(argument[len(prefix):].split("=", 1)[0])
    return names


def run(main: Callable[[], Any]) -> None:
    """Runs an argparse CLI's `main()` (it reads sys.argv) under the error rule above."""
    show = _wants_traceback(sys.argv)
    guarded(main, show)()


def run_absl(main: Callable[[list[str]], Any]) -> None:
    """app.run(main) under the error rule above. `--config.<key>=value` overrides naming no key of the
    schema are refused first, as validate() refuses them in a recipe (config_flags would apply them
    before validation and fail with a bare AttributeError)."""
    from absl import app

    show = _wants_traceback(sys.argv)
    storage.configure_bucket_clients()  # tensorstore follows a GCS emulator; bucket requests are bounded
    guarded(config_lib.check_override_keys, show)(_config_override_names(sys.argv))
    # absl reads the --config file while parsing flags, before main: a syntax error there is the user's
    # ("invalid syntax (my_config.py, line 3)"), and so is a recipe's own ValueError, which absl would print
    # inside its usage text, traceback and all.
    guarded(app.run, show, USER_ERRORS + (SyntaxError,))(guarded(main, show), flags_parser=functools.partial(
        _parse_flags, show_traceback=show))


def _parse_flags(argv: list[str], show_traceback: bool) -> list[str]:
    from absl import app, flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        original = error
        while original.__cause__ or original.__context__:  # config_flags re-raises, absl wraps: the first one
            original = original.__cause__ or original.__context__
        if isinstance(original, USER_ERRORS) and not show_traceback:
            print(_one_line(original), file=sys.stderr, flush=True)
            sys.exit(1)
    return app.parse_flags_with_usage(argv)  # absl's own message for its own errors (an unknown flag)
