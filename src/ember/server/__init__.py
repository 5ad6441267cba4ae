"""The HTTP server: OpenAI-compatible routes over a `ModelBackend`, metrics, settings, `ember serve`."""
