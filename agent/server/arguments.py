"""Tool-call arguments as JSON text, built while the model writes the DSML block
(docs/spec/server-api.md §4.1 "Streaming projection"): each piece is sent at once, and
the final ``arguments`` string is the concatenation itself, so streamed and
non-streamed answers agree byte for byte."""

from __future__ import annotations

import json

from magnetar.runtime import ParameterDelta, ParameterEnded, ParameterStarted, ToolCallEnded, ToolCallStarted


def _json(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


class ArgumentsEncoder:
    """Turns one reply's argument progress events into JSON fragments: ``{`` at the
    invoke, ``,"name":"`` (string) or ``,"name":`` (JSON) at a parameter, the value
    escaped (string) or verbatim with surrounding whitespace trimmed (JSON), the closing
    quote, ``}`` at the invoke's end. ``calls`` keeps each call's whole text in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._string = True
        self._first = True
        self._started = False  # JSON value: a non-blank character was sent
        self._blank = ""  # JSON value: whitespace held until more value follows

    def fragment(self, event) -> str:
        """The JSON text ``event`` adds to the current call ("" for none)."""
        if isinstance(event, ToolCallStarted):
            self.calls.append("")
            self._first = True
            piece = "{"
        elif isinstance(event, ParameterStarted):
            self._string, self._started, self._blank = event.string, False, ""
            piece = ("" if self._first else ",") + _json(event.name) + ":" + ('"' if event.string else "")
            self._first = False
        elif isinstance(event, ParameterDelta):
            piece = _json(event.text)[1:-1] if self._string else self._verbatim(event.text)
        elif isinstance(event, ParameterEnded):
            piece = '"' if self._string else ""
        elif isinstance(event, ToolCallEnded):
            piece = "}"
        else:
            return ""
        self.calls[-1] += piece
        return piece

    def _verbatim(self, text: str) -> str:
        # A JSON body round trips as written; only blanks around it go (the DSML framing).
        text = (self._blank + text) if self._started else text.lstrip()
        body = text.rstrip()
        self._blank = text[len(body):]
        self._started = self._started or bool(body)
        return body
