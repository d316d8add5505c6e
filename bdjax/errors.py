"""One exception family for every user-facing mistake, so the CLI can print a single clear line."""


class BdjaxError(ValueError):
    """Bad input from the user: a missing file, a malformed dataset, an impossible config value."""


class DataError(BdjaxError):
    """A dataset that cannot be found or read, or does not have the expected layout."""


class ConfigError(BdjaxError):
    """A config field that does not exist or holds an impossible value."""


class CheckpointError(BdjaxError):
    """A checkpoint or saved artefact that is missing, corrupt or does not match."""
