"""OpenAI-compatible HTTP server in three layers: `protocol` (pydantic request/response shapes), `serving`
(requests -> engine jobs -> responses and SSE chunks; `engine` runs the continuous batching) and `app` (routes,
errors, auth). `spqr-serve` (`spqr_run.cli.serve`) runs it with uvicorn."""

from spqr_run.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
