"""The live Ember server of the server tests, for the serving benchmark."""

from tests.server.conftest import API_KEY, LiveServer, live_server

__all__ = ["API_KEY", "LiveServer", "live_server"]
