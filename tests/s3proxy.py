"""An HTTP proxy for tests, placed between shardfs and moto's S3 server.

`S3Proxy` listens on 127.0.0.1 and forwards every request unchanged to one
upstream server: method, request target with its query, headers (Host as the
client sent it, so SigV4 signatures stay valid) and body. Hop-by-hop headers
(Connection, Keep-Alive, Expect, ...) are the only ones dropped. Each request
is recorded, so tests can count the chunk objects a mount fetched and the
bytes it received.

Two settings change the responses the client receives:

* `delay_s` adds latency before every request is forwarded.
* `add_fault` spoils chosen responses: an error status, a TCP reset, a body
  cut short or a body with one byte flipped.

Use it through the `counting_proxy` fixture, which a test module gets by
importing it: ``from s3proxy import counting_proxy``.
"""

import collections
import dataclasses
import http.client
import http.server
import socket
import struct
import sys
import threading
import time
import urllib.parse
import xml.sax.saxutils
from collections.abc import Callable

import pytest

# Headers that describe one connection, not the request, so they are not
# forwarded (RFC 9110, section 7.6.1). The proxy handles Expect itself,
# because http.server sends "100 Continue" before a handler reads the body.
# A chunked request body is forwarded as received, with its Transfer-Encoding.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "upgrade",
        "expect",
    }
)

# S3 error codes for injected statuses. botocore's standard retry mode
# (botocore/retries/standard.py) retries statuses 500, 502, 503 and 504 and
# counts SlowDown as throttling.
S3_ERROR_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown"}

UPSTREAM_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class Request:
    """One request as the proxy received it."""

    method: str
    # The path of the request target, percent-decoded, without the query.
    path: str
    query: str

    @property
    def is_chunk_get(self) -> bool:
        return self.method == "GET" and "/chunks/" in self.path

    @property
    def key(self) -> str:
        """The last path component: a chunk's content key for chunk objects."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Fault:
    """A change to one response. Exactly one field is set.

    `status` and `reset` act instead of forwarding the request. `truncate_to`
    and `flip_offset` forward it and change the body that comes back.
    """

    # Reply with this HTTP status and an S3 error document.
    status: int | None = None
    # Close the client's connection with a TCP reset instead of replying.
    reset: bool = False
    # Send the upstream status and headers, with the full Content-Length,
    # but only this many body bytes, then close the connection.
    truncate_to: int | None = None
    # XOR the body byte at this offset with 0xFF and drop the response's
    # x-amz-checksum-* headers. An offset past the body's end changes nothing.
    flip_offset: int | None = None

    def __post_init__(self) -> None:
        chosen = [
            self.status is not None,
            self.reset,
            self.truncate_to is not None,
            self.flip_offset is not None,
        ]
        if sum(chosen) != 1:
            raise ValueError(
                f"invalid fault {self}: set exactly one of status, reset, "
                "truncate_to and flip_offset"
            )


@dataclasses.dataclass
class _FaultRule:
    fault: Fault
    match: Callable[[Request], bool]
    # Matching requests still to spoil, or None to spoil every one.
    remaining: int | None


@dataclasses.dataclass(frozen=True)
class Record:
    """One request and what the proxy returned for it."""

    request: Request
    # The status sent to the client, or None after a reset.
    status: int | None
    # Body bytes sent to the client.
    body_bytes: int
    fault: Fault | None
    # Chunk GETs in progress when this request arrived, itself included.
    chunk_gets_in_flight: int = 0


class _ResetConnection(Exception):
    """Raised by a handler to end the client's connection with a TCP reset."""


class S3Proxy:
    """A recording, optionally delaying and faulting proxy on 127.0.0.1."""

    def __init__(self, upstream_url: str):
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http" or parsed.hostname is None:
            raise ValueError(f"invalid upstream URL {upstream_url!r}: expected http://host:port")
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        # Seconds to wait before forwarding each request.
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._rules: list[_FaultRule] = []
        self._chunk_gets_in_flight = 0
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="s3proxy",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def reset(self) -> None:
        """Forget the recorded requests and the faults not yet used."""
        with self._lock:
            self._records.clear()
            self._rules.clear()

    def add_fault(
        self,
        fault: Fault,
        match: Callable[[Request], bool] = lambda request: request.is_chunk_get,
        count: int | None = 1,
    ) -> None:
        """Spoil the next *count* requests for which *match* is true (all if None).

        Rules are tried in the order added, and a request gets at most one fault.
        """
        with self._lock:
            self._rules.append(_FaultRule(fault, match, count))

    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    def chunk_gets(self) -> int:
        """Return the number of GET requests for chunk objects."""
        return sum(1 for record in self.records() if record.request.is_chunk_get)

    def chunk_gets_by_key(self) -> collections.Counter[str]:
        """Return the number of GET requests for each chunk's content key."""
        return collections.Counter(
            record.request.key for record in self.records() if record.request.is_chunk_get
        )

    def chunk_bytes_by_key(self) -> collections.Counter[str]:
        """Return the body bytes sent for GETs of each chunk's content key."""
        counts: collections.Counter[str] = collections.Counter()
        for record in self.records():
            if record.request.is_chunk_get:
                counts[record.request.key] += record.body_bytes
        return counts

    def chunk_bytes(self) -> int:
        """Return the body bytes sent for all chunk GETs."""
        return sum(self.chunk_bytes_by_key().values())

    def max_chunk_gets_in_flight(self) -> int:
        """Return the maximum number of chunk GETs in progress at once."""
        return max((record.chunk_gets_in_flight for record in self.records()), default=0)

    def _take_fault(self, request: Request) -> Fault | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining == 0 or not rule.match(request):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule.fault
        return None

    def _record(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    def _begin(self, request: Request) -> int:
        """Count *request* as in progress and return the number of chunk GETs in progress."""
        with self._lock:
            if request.is_chunk_get:
                self._chunk_gets_in_flight += 1
            return self._chunk_gets_in_flight

    def _end(self, request: Request) -> None:
        with self._lock:
            if request.is_chunk_get:
                self._chunk_gets_in_flight -= 1


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, proxy: S3Proxy):
        self.proxy = proxy
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        # A daemon that exits drops its kept-alive connections, so connection
        # errors get no traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 keeps the client's connections open, as S3 does.
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None
        self._reset_requested = False

    def handle(self) -> None:
        try:
            super().handle()
        except _ResetConnection:
            self._reset_requested = True

    def finish(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        if not self._reset_requested:
            super().finish()
            return
        # A zero linger time makes close() send RST instead of FIN. The file
        # objects hold references to the socket, so they are closed first or
        # the descriptor would stay open.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.wfile.close()
        self.connection.close()

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy_request()

    do_HEAD = do_GET
    do_PUT = do_GET
    do_POST = do_GET
    do_DELETE = do_GET

    def _proxy_request(self) -> None:
        proxy = self.server.proxy
        target = urllib.parse.urlsplit(self.path)
        request = Request(self.command, urllib.parse.unquote(target.path), target.query)
        in_flight = proxy._begin(request)
        try:
            self._serve(request, in_flight)
        finally:
            proxy._end(request)

    def _serve(self, request: Request, in_flight: int) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        fault = proxy._take_fault(request)
        if proxy.delay_s > 0:
            time.sleep(proxy.delay_s)

        if fault is not None and fault.reset:
            proxy._record(Record(request, None, 0, fault, in_flight))
            raise _ResetConnection()
        if fault is not None and fault.status is not None:
            sent = self._send_error_document(fault.status)
            proxy._record(Record(request, fault.status, sent, fault, in_flight))
            return

        try:
            response, payload = self._forward(body)
        except (OSError, http.client.HTTPException) as exc:
            sent = self._send_error_document(502, f"upstream request failed: {exc}")
            proxy._record(Record(request, 502, sent, fault, in_flight))
            return

        flipped = False
        if fault is not None and fault.flip_offset is not None:
            if fault.flip_offset < len(payload):
                spoiled = bytearray(payload)
                spoiled[fault.flip_offset] ^= 0xFF
                payload = bytes(spoiled)
                flipped = True

        self.send_response_only(response.status, response.reason)
        has_body = self.command != "HEAD" and response.status not in (204, 304)
        for name, value in response.getheaders():
            lowered = name.lower()
            if lowered in HOP_BY_HOP_HEADERS or lowered == "transfer-encoding":
                continue
            # botocore checks x-amz-checksum-* headers when a response has
            # them, so a flipped byte would never reach the client's caller.
            if flipped and lowered.startswith("x-amz-checksum-"):
                continue
            # The body is sent whole, so its length replaces any framing the
            # upstream used. A HEAD reply keeps the length of the object.
            if lowered == "content-length" and has_body:
                continue
            self.send_header(name, value)
        if has_body:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()

        if fault is not None and fault.truncate_to is not None:
            payload = payload[: fault.truncate_to]
            self.close_connection = True
        if has_body:
            self.wfile.write(payload)
        sent = len(payload) if has_body else 0
        proxy._record(Record(request, response.status, sent, fault, in_flight))

    def _read_body(self) -> bytes:
        """Return the request body as sent, chunked framing included."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked_body(self) -> bytes:
        parts = []
        while True:
            size_line = self.rfile.readline()
            parts.append(size_line)
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            parts.append(self.rfile.read(size + 2))
        # Trailer fields, then the empty line that ends the message.
        while True:
            line = self.rfile.readline()
            parts.append(line)
            if line in (b"\r\n", b"\n", b""):
                return b"".join(parts)

    def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        """Send the request upstream and return the response with its whole body.

        A kept-alive upstream connection that the server closed meanwhile is
        replaced once.
        """
        for attempt in (1, 2):
            reused = self._upstream is not None
            if self._upstream is None:
                proxy = self.server.proxy
                self._upstream = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=UPSTREAM_TIMEOUT_S
                )
            try:
                self._send_upstream(body)
                response = self._upstream.getresponse()
                payload = response.read()
            except (ConnectionError, http.client.RemoteDisconnected):
                self._upstream.close()
                self._upstream = None
                if reused and attempt == 1:
                    continue
                raise
            if response.will_close:
                self._upstream.close()
                self._upstream = None
            return response, payload
        raise AssertionError("unreachable")

    def _send_upstream(self, body: bytes) -> None:
        connection = self._upstream
        connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP_HEADERS:
                connection.putheader(name, value)
        connection.endheaders()
        if body:
            connection.send(body)

    def _send_error_document(self, status: int, message: str = "fault injected") -> int:
        """Reply with *status* and an S3 error document, and return the body length."""
        code = S3_ERROR_CODES.get(status, "InjectedFault")
        document = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code>"
            f"<Message>{xml.sax.saxutils.escape(message)}</Message></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(document)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(document)
            return len(document)
        return 0


@pytest.fixture
def counting_proxy(moto_endpoint):
    """An `S3Proxy` in front of the moto server, closed after the test."""
    proxy = S3Proxy(moto_endpoint)
    proxy.start()
    yield proxy
    proxy.close()
