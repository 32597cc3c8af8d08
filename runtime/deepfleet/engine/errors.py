"""Errors the engine raises at start-up for a setting that cannot work on this machine (torch-free, so the server
process can tell them apart): the message names the settings to change, and no stack trace is needed."""


class StartupError(RuntimeError):
    pass
