"""Run the app under uvicorn, with a graceful drain on SIGTERM / SIGINT.

    first signal:  ServerState.drain() on a thread (new requests get 503, running ones finish, at most
                   --drain-timeout seconds), then uvicorn's shutdown (close the socket, wait for open
                   responses, lifespan shutdown: stop the loop, close the engine)
    second signal: exit at once

The model loads on a thread after the socket is up; if loading fails the server stops and
`run_server` raises the loading error (the CLI turns it into exit code 2).
"""
from __future__ import annotations

import logging
import threading

import uvicorn

log = logging.getLogger("moe_engine.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining or self.should_exit:
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        log.info("signal %s: draining running requests, then exiting (send it again to exit now)", sig)
        threading.Thread(target=self._drain_then_exit, name="moe-engine-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        if not self.state.drain():
            log.warning("requests still running after %.0fs; exiting anyway", self.state.config.drain_timeout)
        self.should_exit = True


def build_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=30)
    server = DrainingServer(config, app.state.server)
    app.state.server.on_fatal = lambda: setattr(server, "should_exit", True)
    return server


def show_logs(level: str = "info") -> None:
    """Print moe-engine's own log records (loading, draining, failed steps) the way uvicorn prints its own."""
    logger = logging.getLogger("moe_engine")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level.upper())


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until a signal; raises the model's loading error if loading failed."""
    show_logs(log_level)
    server = build_server(app, host, port, log_level)
    server.run()
    if app.state.server.error is not None:
        raise app.state.server.error


__all__ = ["DrainingServer", "build_server", "run_server"]
