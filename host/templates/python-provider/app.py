"""`{{name}}`: a Hangar model provider written in Python.

As written it needs no network: it answers every message with
`{{name}} heard: ...`, streamed word by word. A real adapter imports
`hangar:plugin/http` in `wit/world.wit`, sends the request to its vendor and
turns the answer into events. Build it with `hangar plugin build`
(componentize-py against `wit/`).
"""

from typing import List, Optional

from wit_world import exports
from wit_world.exports import provider_api
from wit_world.exports.provider_api import Config, Event, Event_Stop, Event_Text, Event_Usage, ProviderInfo, Request
from wit_world.imports.types import ContentBlock_Text, ModelInfo, Role, StopReason, Usage

NAME = "{{name}}"  # must equal `name` in {{name}}.plugin.toml


class Answer(provider_api.Completion):
    """The events of one answer, pulled by the host one at a time."""

    def __init__(self, events: List[Event]):
        self.events = events

    def next(self) -> Optional[Event]:
        return self.events.pop(0) if self.events else None


class ProviderApi(exports.ProviderApi):
    def info(self) -> ProviderInfo:
        # No auth types: the host needs no key to run it.
        return ProviderInfo(id=NAME, name=NAME, auth_types=[], lists_models=True)

    def models(self, cfg: Config) -> List[ModelInfo]:
        return [ModelInfo(id=f"{NAME}-1", name=f"{NAME} 1", context_window=32768)]

    # A failure is raised as componentize_py_types.Err(ProviderError(...)),
    # with a kind the host uses to decide whether to retry.
    def complete(self, cfg: Config, req: Request) -> provider_api.Completion:
        said = ""
        for message in reversed(req.messages):
            if message.role == Role.USER:
                said = " ".join(b.value for b in message.content if isinstance(b, ContentBlock_Text))
                break
        words = f"{NAME} heard: {said}".split(" ")
        events: List[Event] = [Event_Text(w if i == len(words) - 1 else w + " ") for i, w in enumerate(words)]
        events.append(Event_Usage(Usage(input_tokens=0, output_tokens=len(words))))
        events.append(Event_Stop(StopReason.END_TURN))
        return Answer(events)
