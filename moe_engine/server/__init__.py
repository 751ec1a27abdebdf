"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching EngineLoop.

    create_app(engine | engine_factory=..., **ServerConfig fields) -> FastAPI app
    run_server(app, host, port)   uvicorn, draining running requests on SIGTERM

Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics (see app.py).
"""
from .app import ServerConfig, ServerState, create_app
from .run import build_server, run_server

__all__ = ["ServerConfig", "ServerState", "build_server", "create_app", "run_server"]
