"""The operator console: a Flask web console over the DMS tables, standalone or mounted.

- ``dms-worker console --host H --port P`` serves it on its own (``serve``); loopback by
  default, and it refuses any other address unless authentication is configured.
- ``create_blueprint(url_or_engine, ...)`` gives a blueprint a Flask application mounts under a
  prefix of its choosing (``app.register_blueprint(bp, url_prefix="/dms")``).

Modules: ``data`` (what the pages and the CLI read), ``auth`` (roles, credentials, CSRF, the
loopback rule), ``web`` (routes, templates, the standalone app), ``words`` (schedules in words).
Actions are ``worker.client``'s functions, shared with the CLI and the Python client.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from .auth import OPERATOR, READ_ONLY, AuthConfigError, ConsoleAuth, check_bind, hash_password, is_loopback
from .web import create_app, create_app_from_env, create_blueprint

__all__ = ["OPERATOR", "READ_ONLY", "AuthConfigError", "ConsoleAuth", "check_bind", "create_app",
           "create_app_from_env", "create_blueprint", "hash_password", "is_loopback", "serve"]


def serve(app, host: str, port: int, *, announce: Callable[[str], None] = print) -> int:
    """Serve ``app`` until SIGTERM or Ctrl-C; ``port`` 0 picks a free one, announced with the URL."""
    from werkzeug.serving import make_server
    server = make_server(host, port, app, threaded=True)
    shown = f"[{host}]" if ":" in host else host
    announce(f"dms-worker console on http://{shown}:{server.server_port}/")
    sys.stdout.flush()
    # SIGTERM (supervisord, systemd) ends the server like Ctrl-C does, and the command exits 0.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
