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


class Stopped(PebrError):
    """The run was told to stop (SIGTERM) before it finished: exit 128 + SIGTERM, as a
    shell reports a process the signal ended, so a scheduler never reads it as done."""

    exit_code = 143


# torch's own advice in a weights_only refusal: never shown to a user, since following
# it ("re-run with weights_only=False") is how a crafted checkpoint runs its code.
_TORCH_ADVICE = (
    "weights only load failed",
    "re-running `torch.load`",
    "weights_only",
    "check the documentation of torch.load",
    "do it only if you got the file",
)


def load_failure_reason(err: BaseException) -> str:
    """Why torch.load refused or failed, in one line, without torch's unsafe advice.

    For a refused pickle, that is the object it asked for ("unsupported GLOBAL
    posix.system whose module posix is blocked", "Unsupported global: GLOBAL x.Y");
    otherwise the first line of the error that is not advice.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "unsupported global" in line.lower():
            return line.rstrip(".").split(" was not an allowed global", 1)[0]
    for line in lines:
        if not any(advice in line.lower() for advice in _TORCH_ADVICE):
            return line
    return type(err).__name__


def wrapped_user_error(err: BaseException) -> PebrError | None:
    """The PebrError that caused `err`, if one did.

    jsonargparse re-raises whatever a config class's `__init__` raises (GRPOModule's
    unknown reward, a bad setting) as a ValueError listing union subtypes, with the
    original error as its cause: the CLI prints that original as its one line.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, PebrError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
