"""Run the app under uvicorn: a drain bounded by --drain-timeout on SIGTERM / SIGINT, and read timeouts.

    first signal:  deadline = now + drain_timeout
                   ServerState.drain() until deadline - grace (new requests get 503, running ones finish)
                   -> ServerState.abort() for what still runs (streams end with finish_reason "abort" and
                      [DONE], whole responses with a 503 body) -> uvicorn's shutdown, its grace cut to what is
                      left until the deadline -> lifespan shutdown (stop the loop, close the engine)
    second signal: exit at once
    slow clients:  a request head (request line and headers) must arrive within read_timeout seconds of the
                   connection or of the previous response, else the connection is closed (a 408 when part
                   of a head came); the app bounds the body's own time (app.py, the same read_timeout)

The model loads on a thread after the socket is up; if loading fails the server stops and
`run_server` raises the loading error (the CLI turns it into exit code 2).
"""
from __future__ import annotations

import logging
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("moe_engine.server")
KEEP_ALIVE_S = 5                  # an idle keep-alive connection is closed after this (uvicorn's default)
MAX_HEAD_BYTES = 16 * 1024        # request line + headers (h11's buffer limit; more gets a 400)
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n" \
                  b"connection: close\r\n\r\n"


def abort_grace(drain_timeout: float) -> float:
    """Seconds kept at the end of a drain for aborted streams to send their last chunk and the server to close."""
    return min(1.0, drain_timeout / 4)


class ServeConfig(uvicorn.Config):
    """uvicorn's Config plus the request-head deadline the protocol reads."""

    def __init__(self, app, *, head_timeout: float, **kwargs):
        super().__init__(app, **kwargs)
        self.head_timeout = head_timeout


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (uvicorn has none: a client sending its
    headers slowly, or the rest of a body nobody reads, would hold the connection forever)."""

    def connection_made(self, transport) -> None:
        self._head_timer = self._head_after = None
        self._head_bytes = 0
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self.cycle is not self._head_after:            # a request head came: its body is the app's to time
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is answered:    # no pipelined request started
            self._await_head()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._head_after, self._head_bytes = self.cycle, 0
        self._head_timer = self.loop.call_later(self.config.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not self._head_after or self.transport.is_closing():
            return
        if self._head_bytes and self.conn.their_state is h11.IDLE:     # part of a head, not an idle connection
            peer = "%s:%d" % self.client if self.client else "a client"
            log.warning("closed the connection from %s: its request head (%d bytes so far) was not complete after "
                        "%gs (--read-timeout)", peer, self._head_bytes, self.config.head_timeout)
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


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
        log.info("signal %s: draining running requests for up to %gs, then exiting (send it again to exit now)",
                 sig, self.state.config.drain_timeout)
        deadline = time.monotonic() + self.state.config.drain_timeout
        threading.Thread(target=self._drain_then_exit, args=(deadline,), name="moe-engine-drain", daemon=True).start()

    def _drain_then_exit(self, deadline: float) -> None:
        grace = abort_grace(self.state.config.drain_timeout)
        if not self.state.drain(max(0.0, deadline - grace - time.monotonic())):
            log.warning("requests still running at the drain deadline (--drain-timeout %g): ending them with "
                        "finish_reason abort", self.state.config.drain_timeout)
            if not self.state.abort(max(0.0, deadline - time.monotonic())):
                log.warning("the engine loop's step outlasted the drain deadline; closing the open connections")
        left = deadline - time.monotonic()
        self.config.timeout_graceful_shutdown = max(0.1, left)   # read by uvicorn's shutdown (connections)
        self.state.close_timeout = max(0.5, left)                # the loop's last step, then the engine closes
        self.should_exit = True


def build_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> DrainingServer:
    """uvicorn over `app` with the app's read_timeout for request heads and its drain_timeout for the drain."""
    state = app.state.server
    config = ServeConfig(app, head_timeout=state.config.read_timeout, host=host, port=port,
                         log_level=log_level, lifespan="on", http=TimedH11Protocol, timeout_keep_alive=KEEP_ALIVE_S,
                         h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                         timeout_graceful_shutdown=state.config.drain_timeout)
    server = DrainingServer(config, state)
    state.on_fatal = lambda: setattr(server, "should_exit", True)
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


__all__ = ["DrainingServer", "TimedH11Protocol", "build_server", "run_server"]
