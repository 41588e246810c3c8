"""The build's own error, in a module of its own so every part of the builder can raise it."""


class BuildError(RuntimeError):
    """The build produced something wrong (e.g. an executable that disagrees with the reference)."""
