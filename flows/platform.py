"""The services a flow or command works with, built from settings in one direction: settings -> store -> requests.

The CLI builds one for the settings it reads; a task builds its own from the worker's environment, since a flow
run may execute in another process or on another machine.
"""

from __future__ import annotations

from functools import cached_property

from infra.settings import Settings


class Platform:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()

    @cached_property
    def store(self):
        from registry.store import Store

        return Store.from_settings(self.settings)

    @cached_property
    def requests(self):
        from flows.requests import Requests

        return Requests(self.store.mlflow())
