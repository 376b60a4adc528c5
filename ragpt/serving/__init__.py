"""The one request path (prepare -> generate -> finish) and the schedulers that run it."""
