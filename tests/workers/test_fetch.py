"""The SSRF-guarded fetcher against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import ipaddress
import ssl
import subprocess
import threading
import time

import pytest

from schemas.settings import FetchSettings
from workers.errors import FetchFailed, FetchRefused, FetchTooLarge, ImageRejected
from workers.fetch import Fetcher, refusal

PHOTO = b"\xff\xd8" + b"photo" * 100
FLAKY: dict[str, int] = {}  # requests seen per /flaky/<key>/


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path
        if path == "/photo.jpg":
            self._send(200, PHOTO, {"Content-Type": "image/jpeg", "X-Host-Seen": self.headers["Host"]})
        elif path.startswith("/hop/"):  # /hop/N redirects N more times, then to the photo
            n = int(path.rsplit("/", 1)[1])
            self._send(302, b"", {"Location": f"/hop/{n - 1}" if n > 1 else "/photo.jpg"})
        elif path == "/to-metadata":
            self._send(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"})
        elif path == "/to-file":
            self._send(302, b"", {"Location": "file:///etc/passwd"})
        elif path == "/big-declared":
            self._send(200, b"x" * 3000, {})
        elif path == "/big-chunked":  # no Content-Length: the limit must hold while streaming
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"200\r\n" + b"x" * 0x200 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path.startswith("/flaky/"):  # /flaky/<key>/N answers 503 N times per key, then the photo
            _, _, key, n = path.split("/")
            FLAKY[key] = FLAKY.get(key, 0) + 1
            if FLAKY[key] <= int(n):
                self._send(503, b"busy", {})
            else:
                self._send(200, PHOTO, {})
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, PHOTO, {})
        else:
            self._send(404, b"not here", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fetcher(**overrides) -> Fetcher:
    settings = FetchSettings(**{"fetch_allow_private": True, "fetch_max_bytes": 2048,
                                "fetch_read_timeout_s": 0.5, "fetch_attempts": 1, **overrides})
    return Fetcher(settings)


def test_fetches_the_body_following_redirects(server):
    assert fetcher().fetch(f"{server}/photo.jpg") == PHOTO
    assert fetcher().fetch(f"{server}/hop/3") == PHOTO


def test_connects_to_the_checked_address_with_the_original_host_header(server):
    port = server.rsplit(":", 1)[1]
    got = fetcher(fetch_max_redirects=0).fetch(f"http://localhost:{port}/photo.jpg")
    assert got == PHOTO


def test_too_many_redirects_are_refused(server):
    with pytest.raises(FetchRefused) as info:
        fetcher(fetch_max_redirects=2).fetch(f"{server}/hop/3")
    assert info.value.code == "too_many_redirects"


@pytest.mark.parametrize("path, reason", [("/to-metadata", "link-local"), ("/to-file", r"not an http\(s\) URL")])
def test_every_redirect_is_checked_again(server, path, reason):
    with pytest.raises(FetchRefused, match=reason) as info:
        fetcher().fetch(f"{server}{path}")
    assert info.value.code == "url_refused"


@pytest.mark.parametrize("path", ["/big-declared", "/big-chunked"])
def test_the_byte_limit_holds_with_or_without_content_length(server, path):
    with pytest.raises(FetchTooLarge, match="2048-byte limit") as info:
        fetcher().fetch(f"{server}{path}")
    assert info.value.code == "too_large"


def test_http_errors_and_timeouts_say_what_happened(server):
    with pytest.raises(FetchFailed, match="HTTP 404") as info:
        fetcher().fetch(f"{server}/missing.jpg")
    assert info.value.code == "url_status"
    with pytest.raises(FetchFailed) as info:
        fetcher().fetch(f"{server}/slow")
    assert info.value.code == "url_timeout"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_loopback_is_refused_without_the_allow_setting(server, host):
    port = server.rsplit(":", 1)[1]
    with pytest.raises(FetchRefused, match="LOOKALIKE_FETCH_ALLOW_PRIVATE") as info:
        fetcher(fetch_allow_private=False).fetch(f"http://{host}:{port}/photo.jpg")
    assert isinstance(info.value, ImageRejected) and info.value.code == "url_refused"


def test_a_name_that_resolves_to_a_private_address_is_refused_after_resolution():
    settings = FetchSettings(fetch_allow_private=False)
    fake_dns = Fetcher(settings, resolver=lambda host, port: ["93.184.215.14", "10.0.0.7"])
    with pytest.raises(FetchRefused, match="resolves to 10.0.0.7, a private address"):
        fake_dns.fetch("https://images.example.com/a.jpg")


@pytest.mark.parametrize("address, refused", [
    ("8.8.8.8", None), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"),
    ("0.0.0.0", "unspecified"), ("::ffff:127.0.0.1", "loopback"), ("fe80::1", "link-local"),
    ("fc00::1", "private"), ("2606:4700::1111", None),
])
def test_address_rules(address, refused):
    why = refusal(ipaddress.ip_address(address), allow_private=False)
    assert (why is None) if refused is None else (refused in why)
    if refused in ("link-local", "multicast", "reserved", "unspecified"):
        assert refusal(ipaddress.ip_address(address), allow_private=True) is not None


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https server on 127.0.0.1 with a self-signed certificate for the name ``images.test``."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test"],
                   check=True, capture_output=True)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], cert
    httpd.shutdown()
    httpd.server_close()


def test_https_goes_to_the_checked_address_with_the_names_certificate(tls_server):
    """The connection is pinned to the resolved address, yet TLS verifies the URL's host name (SNI)."""
    port, cert = tls_server
    settings = FetchSettings(fetch_allow_private=True, fetch_ca_file=cert)
    resolved = []

    def resolver(host, port):
        resolved.append(host)
        return ["127.0.0.1"]

    assert Fetcher(settings, resolver=resolver).fetch(f"https://images.test:{port}/photo.jpg") == PHOTO
    assert resolved == ["images.test"]
    with pytest.raises(FetchFailed, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        Fetcher(settings, resolver=lambda host, port: ["127.0.0.1"]).fetch(f"https://other.test:{port}/photo.jpg")


def test_a_failure_that_may_pass_is_tried_again_within_the_bound(server):
    assert fetcher(fetch_attempts=3).fetch(f"{server}/flaky/a/2") == PHOTO
    assert FLAKY["a"] == 3
    with pytest.raises(FetchFailed) as info:
        fetcher(fetch_attempts=3).fetch(f"{server}/flaky/b/5")
    assert info.value.code == "url_status" and "503" in info.value.message
    assert FLAKY["b"] == 3


def test_a_missing_image_is_not_tried_again(server):
    FLAKY.clear()
    with pytest.raises(FetchFailed) as info:
        fetcher(fetch_attempts=3).fetch(f"{server}/nowhere.jpg")
    assert "404" in info.value.message and not info.value.retryable
