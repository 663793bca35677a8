"""The listening sockets, opened before anything slow starts.

A service that loads its models first and then finds its port taken has made the user wait
for a traceback. Binding comes first instead: a busy port, or a host that is not this
machine's, ends start-up at once with one line that names the address and the flag to
change. The sockets are handed to the event loop's server afterwards, as asyncio would have
made them (every address the host resolves to, SO_REUSEADDR, IPv6 sockets IPv6 only).
"""

from __future__ import annotations

import errno
import socket


class ListenError(Exception):
    """The address cannot be listened on; the message is the one line to show."""


def bind(host: str, port: int, flag: str = "--port") -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address of `host`; ListenError if any fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(
            f"cannot listen on {host!r}: {exc.strerror} (choose an address of this machine with --host)"
        ) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise ListenError(_reason(host, port, exc, flag)) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _reason(host: str, port: int, exc: OSError, flag: str) -> str:
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is in use (another service running?); choose another with {flag}"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); use another {flag}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host} is not an address of this machine; choose another with --host"
    return f"cannot listen on {where}: {exc.strerror}"
