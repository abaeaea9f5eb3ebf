"""Downloading an image from a URL (an images API's answer, an http(s) image in a row), within bounds.

- only `http` and `https` URLs;
- redirects followed on the same host only (at most `MAX_REDIRECTS`), never to another host;
- the host name is resolved once (`socket.getaddrinfo`), every address it resolves to is
  checked, and the connection goes to the checked address (the `Host` header and, for
  https, the TLS server name and certificate check keep the name), so a name that
  resolves differently a moment later (DNS rebinding) cannot slip past the check;
- addresses that are not public (loopback, private, link-local, shared, reserved,
  multicast; IPv4-mapped IPv6 included) are refused unless `allow_internal`: the images
  API's own `base_url` is such an address (a self-hosted server);
- a size cap (`Content-Length` above it refused before reading; the body read in pieces
  and stopped once past it) and a total deadline per image (a watchdog closes the
  connection when it passes, so a server trickling a byte at a time cannot hold it).

Standard library only; environment proxies (`HTTP_PROXY`) are not used for these downloads.
Name resolution itself (`getaddrinfo`) cannot be interrupted and is not inside the deadline.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3
_PIECE = 64 * 1024


class DownloadRefused(Exception):
    """A URL that was not downloaded, and why (one line)."""


def is_internal(address: str) -> bool:
    """Whether an IP address is anything but a public unicast one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def url_is_internal(url: str | None) -> bool:
    """Whether `url`'s host is (or resolves only to) internal addresses; False when unknown."""
    host = urllib.parse.urlsplit(url).hostname if url else None
    if not host:
        return False
    try:
        addresses = _resolve(host, 443)
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(is_internal(address) for address in addresses)


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a checked address, speaking to `host` by name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def _socket(self) -> socket.socket:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def connect(self) -> None:
        self.sock = self._socket()


class _PinnedHTTPS(_PinnedHTTP):
    default_port = 443

    def connect(self) -> None:
        self.sock = ssl.create_default_context().wrap_socket(self._socket(), server_hostname=self.host)


def _checked_address(host: str, port: int, allow_internal: bool) -> str:
    try:
        addresses = _resolve(host, port)
    except (OSError, UnicodeError) as error:
        raise DownloadRefused(f"cannot resolve {host}: {error}") from None
    internal = [address for address in addresses if is_internal(address)]
    if internal and not allow_internal:
        raise DownloadRefused(f"host {host} is an internal address ({internal[0]}); images are downloaded "
                              "from internal addresses only when the API's base_url is one itself")
    if not addresses:
        raise DownloadRefused(f"cannot resolve {host}")
    return addresses[0]


def download(url: str, *, allow_internal: bool, max_bytes: int, deadline: float) -> bytes:
    """The body of `url` (HTTP 200), within the bounds the module describes; DownloadRefused otherwise."""
    end = time.monotonic() + deadline
    first_host = None
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise DownloadRefused(f"only http(s) URLs are downloaded, not {parts.scheme or 'scheme-less'}: URLs")
        host = (parts.hostname or "").lower()
        if not host:
            raise DownloadRefused("the URL names no host")
        if first_host is not None and host != first_host:
            raise DownloadRefused(f"redirected from {first_host} to another host ({host}); not followed")
        first_host = host
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as error:
            raise DownloadRefused(f"malformed URL: {error}") from None
        address = _checked_address(host, port, allow_internal)
        status, location, body = _get(parts, host, port, address, end, deadline, max_bytes)
        if status in REDIRECT_STATUSES and location:
            url = urllib.parse.urljoin(url, location)
            continue
        if status != 200:
            raise DownloadRefused(f"HTTP {status}")
        return body
    raise DownloadRefused(f"more than {MAX_REDIRECTS} redirects")


def _get(parts: urllib.parse.SplitResult, host: str, port: int, address: str, end: float,
         deadline: float, max_bytes: int) -> tuple[int, str | None, bytes]:
    remaining = end - time.monotonic()
    if remaining <= 0:
        raise DownloadRefused(f"took longer than {deadline:g} s")
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    connection = kind(host, port, address, timeout=remaining)
    expired = threading.Event()

    def abort() -> None:  # the deadline passed: whatever is blocked on the socket returns now
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(remaining, abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", target, headers={"Accept": "image/*", "Accept-Encoding": "identity"})
        response = connection.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length") or ""
        if length.isdigit() and int(length) > max_bytes:
            raise DownloadRefused(f"the image is {int(length)} bytes, over max_download_bytes={max_bytes}")
        pieces, size = [], 0
        while piece := response.read1(_PIECE):
            size += len(piece)
            if size > max_bytes:
                raise DownloadRefused(f"the image is over max_download_bytes={max_bytes}; stopped")
            if expired.is_set():
                break
            pieces.append(piece)
        if expired.is_set() or time.monotonic() > end:
            raise DownloadRefused(f"took longer than {deadline:g} s; stopped")
        return 200, None, b"".join(pieces)
    except (OSError, http.client.HTTPException) as error:
        if expired.is_set() or time.monotonic() > end:
            raise DownloadRefused(f"took longer than {deadline:g} s; stopped") from None
        raise DownloadRefused(f"{type(error).__name__}: {error}") from None
    finally:
        watchdog.cancel()
        connection.close()
