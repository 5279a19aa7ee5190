"""Exception types. Each is raised with a one-line message that says what to do."""


class AdapterError(Exception):
    """Base class of every error lowrank raises on bad input."""


class ConfigError(AdapterError, ValueError):
    """An AdapterConfig field (or config JSON) is invalid."""


class TargetError(AdapterError, ValueError):
    """target_modules matched nothing, or matched a module that cannot be adapted."""


class AdapterFileError(AdapterError, OSError):
    """An adapter directory or file is missing, unreadable, or not a safetensors file."""


class AdapterMismatchError(AdapterError, ValueError):
    """A saved adapter does not fit the model (other method, other shapes, other modules)."""
