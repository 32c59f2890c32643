"""What every `soma` command group shares: the SDK client and where its output goes."""

from __future__ import annotations

from typing import TextIO

from services.client.sdk import SomaClient


class CommandGroup:
    """A group of commands: output goes to `out` (JSON when `as_json`), notes to `err`."""

    def __init__(self, client: SomaClient, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.client = client
        self.json = as_json
        self.out = out
        self.err = err

    def print(self, text: str) -> None:
        print(text, file=self.out)
