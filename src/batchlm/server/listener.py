"""The server's listening socket, tried before the model loads: a port in use or a host that does not
resolve is then one error line at once, not a failure after start-up has begun."""

from __future__ import annotations

import socket

# Pending connections a listening socket queues (uvicorn's default).
LISTEN_BACKLOG = 2048


def bind_listener(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """A listening TCP socket on host:port (port 0: one the system picks). `shared` lets other
    processes bind the same port (SO_REUSEPORT: the API servers of `--api-servers N`); without it a
    second server on the port is refused, as it should be."""
    # "" is every interface, as uvicorn binds it; getaddrinfo takes that as None, not as a name.
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # A restarted server can bind again while the old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
