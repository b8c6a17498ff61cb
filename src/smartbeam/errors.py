"""Exception types shared by the whole package."""


class SmartbeamError(Exception):
    """Base class of every error smartbeam raises on purpose."""


class SmartbeamInputError(SmartbeamError, ValueError):
    """Bad user input: the message names the offending value and what was expected."""
