"""Fetch an image by URL without letting the URL reach inside the network (an SSRF guard).

Every hop (the URL and each redirect) is parsed, its host resolved, and every address it
resolves to checked before connecting; the connection then goes to the checked address
(with the original ``Host`` header and TLS server name), so a second DNS answer cannot
swap in another one (DNS rebinding). Refused: anything but http(s), link-local (cloud
metadata at 169.254.169.254), multicast, reserved and unspecified addresses, and, unless
``LOOKALIKE_FETCH_ALLOW_PRIVATE``, private, loopback and other non-global ones. The body is
counted while it streams and the fetch stops at the byte limit or the total deadline.
(Checks follow the OWASP "Server-Side Request Forgery Prevention Cheat Sheet".)

Errors are :class:`workers.errors.FetchError` subclasses; see ``workers/errors.py``.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from schemas.settings import FetchSettings
from workers.errors import FetchFailed, FetchRefused, FetchTooLarge

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
USER_AGENT = "Lookalike/0.1 (image fetcher)"


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), as text."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def refusal(address: Address, allow_private: bool) -> str | None:
    """Why ``address`` may not be fetched from, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("link_local", "multicast", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if address.is_reserved and not address.is_loopback:  # ::1 sits inside the reserved ::/8
        return "a reserved address"
    if not address.is_global and not allow_private:
        kind = "loopback" if address.is_loopback else "private" if address.is_private else "non-global"
        return f"a {kind} address (allowed only with LOOKALIKE_FETCH_ALLOW_PRIVATE=true)"
    return None


class Fetcher:
    """Fetches image bytes by URL within the limits of :class:`schemas.settings.FetchSettings`.

    Safe to share between threads (one pooled ``httpx.Client``).

    Args:
        settings: Limits and the private-address switch.
        resolver: ``(host, port) -> [address, ...]``; the system resolver by default.
    """

    def __init__(self, settings: FetchSettings, resolver: Resolver = resolve) -> None:
        self.settings = settings
        self.resolver = resolver
        timeout = httpx.Timeout(settings.fetch_read_timeout_s, connect=settings.fetch_connect_timeout_s)
        verify = ssl.create_default_context(cafile=settings.fetch_ca_file) if settings.fetch_ca_file else True
        self._client = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, verify=verify,
                                    headers={"User-Agent": USER_AGENT, "Accept": "image/*"})

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str) -> bytes:
        """The body of ``url``, tried up to ``fetch_attempts`` times while the failure may pass
        (timeouts, connection errors, HTTP 429 and 5xx), with exponential backoff from 0.5 s.

        Raises:
            FetchRefused, FetchFailed, FetchTooLarge: as :meth:`fetch_once`, after the last try.
        """
        retrying = Retrying(retry=retry_if_exception(lambda exc: isinstance(exc, FetchFailed) and exc.retryable),
                            stop=stop_after_attempt(self.settings.fetch_attempts),
                            wait=wait_exponential(multiplier=0.5, max=4), reraise=True)
        return retrying(self.fetch_once, url)

    def fetch_once(self, url: str) -> bytes:
        """The body of ``url`` after at most ``fetch_max_redirects`` redirects, in one try.

        Args:
            url: An absolute http(s) URL.

        Returns:
            The response body, at most ``fetch_max_bytes`` bytes.

        Raises:
            FetchRefused: ``url_refused`` (scheme or address) or ``too_many_redirects``.
            FetchFailed: ``url_unreachable`` (DNS or connection), ``url_timeout`` or ``url_status``.
            FetchTooLarge: ``too_large``.
        """
        deadline = time.monotonic() + self.settings.fetch_total_timeout_s
        for _ in range(self.settings.fetch_max_redirects + 1):
            target, host, sni = self._check(url)
            try:
                with self._client.stream("GET", target, headers={"Host": host},
                                         extensions={"sni_hostname": sni} if sni else {}) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        if not location:
                            raise FetchFailed(f"{url} answered {response.status_code} without a Location",
                                              "url_status", retryable=False)
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        status = response.status_code
                        raise FetchFailed(f"{url} answered HTTP {status}; give a URL that serves the image itself",
                                          "url_status", retryable=status == 429 or status >= 500)
                    return self._read(url, response, deadline)
            except httpx.TimeoutException:
                raise FetchFailed(f"{url} did not answer in time (connect {self.settings.fetch_connect_timeout_s} s, "
                                  f"read {self.settings.fetch_read_timeout_s} s)", "url_timeout") from None
            except httpx.HTTPError as exc:
                raise FetchFailed(f"could not fetch {url}: {type(exc).__name__}: {exc}", "url_unreachable") from None
        raise FetchRefused(f"the image URL redirected more than {self.settings.fetch_max_redirects} times "
                           "(LOOKALIKE_FETCH_MAX_REDIRECTS); give the final URL", "too_many_redirects")

    def _check(self, url: str) -> tuple[str, str, str | None]:
        """``(url to connect to, Host header, TLS server name)`` after checking every address of the host."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise FetchRefused(f"{url!r} is not a valid URL ({exc})", "url_refused") from None
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in ("http", "https") or not host:
            raise FetchRefused(f"{url!r} is not an http(s) URL with a host; only http and https are fetched",
                               "url_refused")
        port = port or (443 if scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in self.resolver(host, port)]
        except (OSError, UnicodeError) as exc:
            raise FetchFailed(f"the host {host!r} of the image URL could not be resolved ({exc})",
                              "url_unreachable") from None
        if not addresses:
            raise FetchFailed(f"the host {host!r} of the image URL has no address", "url_unreachable")
        for address in addresses:
            why = refusal(address, self.settings.fetch_allow_private)
            if why:
                raise FetchRefused(f"the image URL's host {host!r} resolves to {address}, {why}; "
                                   "give a public URL", "url_refused")
        pinned = addresses[0]
        netloc = f"[{pinned}]:{port}" if pinned.version == 6 else f"{pinned}:{port}"
        target = parts._replace(scheme=scheme, netloc=netloc).geturl()
        default_port = parts.port is None or parts.port == (443 if scheme == "https" else 80)
        host_header = host if default_port else f"{host}:{port}"
        if ":" in host and default_port:
            host_header = f"[{host}]"
        elif ":" in host:
            host_header = f"[{host}]:{port}"
        return target, host_header, host if scheme == "https" else None

    def _read(self, url: str, response: httpx.Response, deadline: float) -> bytes:
        limit = self.settings.fetch_max_bytes
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise FetchTooLarge(f"{url} is {length} bytes, more than the {limit}-byte limit "
                                "(LOOKALIKE_FETCH_MAX_BYTES)")
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise FetchTooLarge(f"{url} sent more than the {limit}-byte limit (LOOKALIKE_FETCH_MAX_BYTES); "
                                    "give a smaller image")
            if time.monotonic() > deadline:
                raise FetchFailed(f"{url} took longer than {self.settings.fetch_total_timeout_s} s to send "
                                  "(LOOKALIKE_FETCH_TOTAL_TIMEOUT_S)", "url_timeout")
        return bytes(body)
