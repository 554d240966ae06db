"""The exceptions dualenc raises on bad input: each is a ValueError, so callers may catch either."""


class DualEncError(ValueError):
    """Base class of every error dualenc raises on bad input (a missing file is an OSError instead)."""


class ConfigError(DualEncError):
    """A config (object or config.json) that is invalid or asks for something not implemented."""


class InputError(DualEncError):
    """Arrays, images or texts passed to the model or processors with a wrong shape, dtype or value."""


class CheckpointError(DualEncError):
    """A weights file that is corrupt, truncated, or does not match the config (missing, unexpected, mis-shaped)."""


class DataError(DualEncError):
    """A dataset or caption file that cannot be read."""
