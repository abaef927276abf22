"""Running an app: :func:`bind` (the listening socket, or a one-line error), :func:`serve_forever`
(uvicorn on that socket) and ``ServerThread`` (a server on a background thread: tests, notebooks).

The socket is bound before anything is announced, so a busy port or an impossible address fails
at once with a ``ValueError`` naming it, and the port printed is the port that listens.
"""
from __future__ import annotations

import errno
import socket
import threading
import time


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 = any free port)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is out of range: a TCP port is 1..65535 (0 = any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: cannot resolve the address ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"{where} is already in use (another server is listening there); "
                             "stop it or choose another --port") from None
        raise ValueError(f"cannot listen on {where}: {e.strerror or e}") from None
    return sock


def _server(app, log_level: str = "warning"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))


def serve_forever(app, sock: socket.socket) -> None:
    """Serves ``app`` on the bound ``sock`` until Ctrl-C."""
    try:
        _server(app).run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """Runs ``app`` with uvicorn on a free loopback port in a daemon thread.

    ``with ServerThread(app) as srv: ...`` gives ``srv.url`` (``http://127.0.0.1:PORT``);
    the port is bound before the thread starts, so there is no race for it.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = _server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, wait: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > wait:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
