"""What the command-line tools share: every mistake ends the program with one line on stderr,
`error: <argument>: <what was wrong>`, and exit status 2; `--help` shows each default once.

The library's own checks raise ValueError with messages that start with the argument's name; a
tool runs the part of its work that can meet bad input under `one_line_errors()`, so that those
(and a file that cannot be read or written, or a missing optional package) become the one line
instead of a traceback.
"""
import argparse
import contextlib
import sys

# Errors that mean "the input was wrong" (the library raises ValueError naming the argument), a file
# could not be read or written, or an optional package is missing.
USAGE_ERRORS = (ValueError, OSError, ImportError)


def fail(message: str):
    """Print `error: message` and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's own line breaks, and appends "(default: X)" to every option that has
    a default unless its help names it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        # `is`, not `in`: a default of 0 equals False and is still shown.
        if "default" in text or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose own complaints (a missing or malformed option) are one line too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(message)


@contextlib.contextmanager
def one_line_errors():
    """Turns the library's input errors raised inside the block into the one-line exit."""
    try:
        yield
    except USAGE_ERRORS as error:
        fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
