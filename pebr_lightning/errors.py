"""User-facing errors: the `pebr` command prints these without a traceback.

Anything a user can fix by editing a file or a setting (a bad manifest line, a
missing image, a wrong config value) raises a subclass of `PebrError` whose
message names the file, line, field or sample. Programming errors stay ordinary
exceptions so that their traceback is shown.
"""


class PebrError(Exception):
    """An error caused by user input; the CLI prints it and exits with code 2."""

    exit_code = 2


class ManifestError(PebrError):
    """A manifest (or an image it points to) is unusable."""
