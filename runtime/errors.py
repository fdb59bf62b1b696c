"""The runtime's error: a program that cannot be loaded or run, naming the layer."""


class ProgramError(ValueError):
    """A malformed program, a bad feed, or a layer the runtime cannot execute."""
