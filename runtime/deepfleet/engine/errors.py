"""Errors of the engine that the server process tells apart (torch-free, so it can import them): StartupError for
a setting that cannot work on this machine (the message names the settings to change, and no stack trace is
needed), SlotsBusy for a request to retry later."""


class StartupError(RuntimeError):
    pass


class SlotsBusy(RuntimeError):
    """A request cannot be placed now, though the same request may be a little later: its LoRA adapter is not
    resident and every adapter slot serves unfinished requests (lora/manager.py). The server answers 503 with
    Retry-After; the message says which adapters hold the slots."""
