"""The project's user-facing error types: what a CLI reports as one line and exit code 2.

Everything a user can cause (a flag, a file, a checkpoint, a dataset, a disk) raises a subclass of `UserError`;
CLIs catch exactly these (`megatron.offload.USER_ERRORS` adds `moe.offload.OffloadError` for the CLIs that offload:
`moe/` cannot import this package by design) and let every other exception, an internal bug, keep its traceback.
Subclassing ValueError keeps `except ValueError` callers and `pytest.raises(ValueError)` working.
"""


class UserError(ValueError):
    """Base: a problem the user can fix; the message names the flag or file, the rule, and the fix."""


class ConfigError(UserError):
    """A bad flag or configuration value (or combination of values)."""


class CheckpointError(UserError):
    """An unreadable, torn, corrupted or mismatched checkpoint; or a save that could not be completed."""


class DataError(UserError):
    """A missing, truncated or malformed data, index-cache or tokenizer file."""


class TrainingError(UserError):
    """Training cannot go on for a reason found at run time (e.g. a non-finite loss or gradient)."""
