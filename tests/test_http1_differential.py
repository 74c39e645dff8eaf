"""The data plane's HTTP/1.1 parser (csrc/proxy/http1.pyx) against llhttp (httptools, strict:
its default, no lenient flags), on requests that hypothesis makes and breaks.

Why: a gateway and the server behind it that read one request two ways is request
smuggling. The two parsers must agree on whether a request is refused and, when it is not,
on its method, target, headers and body, request by request along a pipelined stream fed
in odd pieces. Where they may differ is listed below, each with its reason; anything else
is a bug in one of them (in ours, so far).
"""
from __future__ import annotations

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway._native.http1 import Refused, decode_chunked, parse_request_head

MAX_BODY = 64 << 20  # the gateway's default --max-body-mb

# We refuse, llhttp accepts: what our refusal says, and why we refuse.
WE_REFUSE = {
    "without a Host header": "RFC 9112 3.2: a server must answer 400 to an HTTP/1.1 request "
                             "without Host; llhttp leaves that to its application",
    "more than one Host header": "RFC 9112 3.2 again: two Hosts are a 400 (which one would the "
                                 "upstream route by?)",
    "more than one Authorization header": "one would be checked and the other passed on "
                                          "(issue 21, L7)",
    "Transfer-Encoding in an HTTP/1.0 request": "RFC 9112 6.1: an HTTP/1.0 hop reads such a "
                                                "body to the connection's end",
    "the request target is not a path": "the gateway routes origin-form paths only: no '*', "
                                        "absolute-form or authority-form targets",
    "the version is not HTTP/1.0 or HTTP/1.1": "llhttp takes any HTTP/<digit>.<digit> on a "
                                               "request line; the gateway speaks 1.0 and 1.1",
    "the request line is not one method": "llhttp takes runs of spaces between the parts of "
                                          "a request line; we take exactly one (RFC 9112 3)",
    "before the request line": "llhttp skips CRs and LFs before a request line (RFC 9112 2.2: "
                               "may); nothing we serve sends them",
    "larger than the limit": "bodies past --max-body-mb (413); llhttp has no limit",
    "Transfer-Encoding other than one 'chunked'": "RFC 9112 6.1 lets codings such as gzip "
                                                  "come before chunked; we take chunked "
                                                  "alone: coding lists are where front and "
                                                  "back ends disagree in request smuggling, "
                                                  "and no worker decodes them (found by "
                                                  "hypothesis in CI)",
    "malformed chunk extension": "we hold chunk extensions to RFC 9112 7.1.1 (';' name, "
                                 "'=' and a token or quoted-string); llhttp takes an empty "
                                 "value after '='",
    "a line ends in a bare LF": "RFC 9112 2.2 lets a server take a bare LF as a line's end; "
                                "we answer 400 at once (issue 21, L6: such heads waited 30 s "
                                "for a 408), where llhttp waits for the rest of a request line "
                                "it has not judged yet",
}
# llhttp refuses, we accept: what llhttp says, and why we accept.
WE_ACCEPT = {
    "Invalid method encountered": "any token is a method to us (the service behind decides "
                                  "what it serves); llhttp knows a fixed list",
    "Expected HTTP/2 Connection Preface": "PRI is a method like any other to us; llhttp takes "
                                          "it for HTTP/2's preface (whose '*' target and "
                                          "HTTP/2.0 we refuse)",
}

KNOWN_METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]
ODD_METHODS = [b"FOO", b"get", b"G(T", b"", b"CONNECT", b"PRI", b"M-SEARCH"]
TARGET_BYTES = [bytes([c]) for c in b"az09/?=&%.-_~:@!$'()*+,;"] + [
    b'"', b"<", b">", b"{", b"}", b"|", b"`", b"^", b"#", b"\\", b"[", b"]",
    b"\x80", b"\xff", b"\t", b" ", b"\x7f", b"\x00", b"\r", b"\n"]
VERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 3 + [
    b"http/1.1", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/1.1 ", b"HTTP/1.", b"HTTP/11", b"HTTP/0.9"]
NAMES = [b"X-A", b"x-b", b"Accept", b"Authorization", b"Host", b"Expect", b"Upgrade",
         b"Connection", b"Trailer", b"Keep-Alive"]
ODD_NAMES = [b"X A", b"X(", b"", b"X-\x80", b" X", b"X\t", b"Content-Length ", b"\x00"]
VALUE_PIECES = [b"a", b"B", b"0", b" ", b"\t", b",", b'"', b"/", b"=", b"\x80", b"\xff",
                b"\x00", b"\x7f", b"\x01", b"close", b"keep-alive", b"upgrade",
                b"100-continue", b"chunked"]
CHUNK_EXTENSIONS = [b"", b";a", b";a=b", b';a="b c"', b";a=b;c", b"; a", b";a =b", b";", b";a=",
                    b";\x01", b';a="\\"x"', b" "]
TRAILERS = [b"X-T: 1\r\n", b"X-U: a b\r\n", b"bad trailer\r\n", b"X-V:\x01\r\n"]

names = st.one_of(st.sampled_from(NAMES), st.sampled_from(ODD_NAMES))
values = st.lists(st.sampled_from(VALUE_PIECES), max_size=4).map(b"".join)
targets = st.one_of(
    st.lists(st.sampled_from(TARGET_BYTES), max_size=8).map(lambda p: b"/" + b"".join(p)),
    st.sampled_from([b"/", b"*", b"http://a/x", b"", b"a", b"/api/predict/s?q=1"]))


@st.composite
def framings(draw):
    """(header lines, body bytes) of a body, well or badly framed."""
    body = draw(st.binary(max_size=20))
    kind = draw(st.sampled_from(["none", "length", "length", "chunked", "chunked",
                                 "two-lengths", "bad-length", "odd-te", "both"]))
    if kind == "none":
        return [], b""
    if kind == "length":
        return [b"Content-Length: %d" % len(body)], body
    if kind == "two-lengths":
        second = draw(st.sampled_from([len(body), len(body) + 1]))
        return [b"Content-Length: %d" % len(body), b"Content-Length: %d" % second], body
    if kind == "bad-length":
        value = draw(st.sampled_from([b"+1", b"1, 1", b"1 1", b"-1", b"0x1", b"",
                                      b"99999999999999999999999", b"007", b"1\x00"]))
        return [b"Content-Length: " + value], b"x" * 7
    chunks = draw(st.lists(st.binary(min_size=1, max_size=9), max_size=3))
    encoded = b"".join(b"%x%s\r\n%s\r\n" % (len(c), draw(st.sampled_from(CHUNK_EXTENSIONS)), c)
                       for c in chunks)
    encoded += b"0%s\r\n" % draw(st.sampled_from(CHUNK_EXTENSIONS))
    encoded += b"".join(draw(st.lists(st.sampled_from(TRAILERS), max_size=2))) + b"\r\n"
    if kind == "odd-te":
        te = draw(st.sampled_from([b"gzip", b"chunked, chunked", b"Chunked", b"identity",
                                   b"chunked ", b"gzip, chunked"]))
        return [b"Transfer-Encoding: " + te], encoded
    if kind == "both":
        return [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(encoded)], encoded
    return [b"Transfer-Encoding: chunked"], encoded


@st.composite
def requests(draw):
    method = draw(st.one_of(st.sampled_from(KNOWN_METHODS), st.sampled_from(ODD_METHODS)))
    version = draw(st.sampled_from(VERSIONS))
    lines = [b"%s %s %s" % (method, draw(targets), version)]
    hosts = draw(st.sampled_from([1, 1, 1, 1, 0, 2]))
    headers = [b"Host: gw"] * hosts + [b"%s: %s" % (draw(names), draw(values))
                                       for _ in range(draw(st.integers(0, 3)))]
    framing, body = draw(framings())
    headers += framing
    order = draw(st.permutations(headers))
    return b"\r\n".join(lines + list(order)) + b"\r\n\r\n" + body


@st.composite
def streams(draw):
    """Pipelined requests, maybe broken (a bare LF, an obs-fold, a stray byte), and the
    points llhttp is fed at."""
    data = b"".join(draw(st.lists(requests(), min_size=1, max_size=3)))
    mutation = draw(st.sampled_from(["none"] * 4 + ["bare-lf", "fold", "byte", "cut"]))
    if mutation != "none" and data:
        at = draw(st.integers(0, len(data) - 1))
        if mutation == "bare-lf":
            crlf = data.find(b"\r\n", at)
            if crlf >= 0:
                data = data[:crlf] + data[crlf + 1:]
        elif mutation == "fold":
            crlf = data.find(b"\r\n", at)
            if crlf >= 0:
                data = data[:crlf + 2] + b" " + data[crlf + 2:]
        elif mutation == "byte":
            data = data[:at] + draw(st.sampled_from(
                [b"\x00", b"\r", b"\n", b" ", b"\x7f", b"\x80", b":"])) + data[at:]
        else:
            data = data[:at]
    splits = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return data, splits


def normalized(headers):
    """Header values without the whitespace around them (RFC 9110 5.5: it is not part of
    the value; llhttp keeps what trails)."""
    return [(name, value.strip(b" \t")) for name, value in headers]


def closes(minor: int, headers) -> bool:
    tokens = b",".join(v.lower() for n, v in headers if n.lower() == b"connection")
    words = {t.strip() for t in tokens.split(b",")}
    return b"close" in words if minor == 1 else b"keep-alive" not in words


def ours(data: bytes, step: int):
    """(messages, refusal or None, waiting): what the data plane reads of `data`, in order,
    up to a refusal, a message after which the connection closes, or the bytes' end
    (waiting: a message has begun there)."""
    messages = []
    while data:
        try:
            head = parse_request_head(data)
            if head is None:
                return messages, None, True
            method, target, minor, headers, length, chunked, size = head
            rest = data[size:]
            if length > MAX_BODY:
                raise Refused(413, f"request body is larger than the limit of {MAX_BODY} bytes")
            if chunked:
                decoded = decode_chunked(rest, MAX_BODY, step)
                if decoded is None:
                    return messages, None, True
                body, used = decoded
            else:
                used = max(length, 0)
                if len(rest) < used:
                    return messages, None, True
                body = rest[:used]
        except Refused as refusal:
            return messages, str(refusal), False
        messages.append((method, target, normalized(headers), body))
        data = rest[used:]
        if closes(minor, headers):
            break
    return messages, None, False


class _Messages:
    def __init__(self):
        self.messages = []
        self.parser = None

    def on_message_begin(self):
        self.url, self.headers, self.body = b"", [], b""

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_headers_complete(self):
        self.head = normalized(self.headers)  # (what follows are trailers)
        self.method = self.parser.get_method()

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.messages.append((self.method, self.url, self.head, self.body))


def llhttp(data: bytes, splits: list[int]):
    """(messages, refusal or None) of llhttp fed `data` in pieces cut at `splits`."""
    seen = _Messages()
    seen.parser = parser = httptools.HttpRequestParser(seen)
    start = 0
    try:
        for end in splits + [len(data)]:
            parser.feed_data(data[start:end])
            start = end
    except httptools.HttpParserUpgrade:  # (CONNECT, or Connection: upgrade): not served
        return seen.messages[:-1], "upgrade"  # (so the message that asked is no message)
    except httptools.HttpParserError as exc:
        if "Data after `Connection: close`" in str(exc):
            return seen.messages, None  # we stop reading there too
        return seen.messages, str(exc) or type(exc).__name__
    return seen.messages, None


def judge(data: bytes, splits: list[int], step: int) -> None:
    our_messages, our_refusal, waiting = ours(data, step)
    their_messages, their_refusal = llhttp(data, splits)
    agreed = min(len(our_messages), len(their_messages))
    assert our_messages[:agreed] == their_messages[:agreed], (data, our_messages,
                                                              their_messages)
    if our_refusal is None and their_refusal is None:
        assert our_messages == their_messages, (data, our_messages, their_messages)
    if len(our_messages) < len(their_messages) or (our_refusal is not None and
                                                   their_refusal is None):
        assert our_refusal is not None and any(reason in our_refusal for reason in WE_REFUSE), \
            (data, our_refusal, our_messages, their_messages)
    if len(our_messages) > len(their_messages) or (their_refusal is not None and
                                                   our_refusal is None and not waiting):
        # (waiting for the rest of a message llhttp refused already: we took nothing more)
        assert their_refusal is not None and any(
            reason in their_refusal for reason in WE_ACCEPT), (data, their_refusal,
                                                               our_messages, their_messages)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(streams(), st.integers(0, 7))
def test_our_parser_agrees_with_llhttp(stream, step):
    data, splits = stream
    judge(data, splits, step)


def test_the_listed_differences_are_real():
    """Each allowed difference happens (a list of excuses that nothing needs would hide
    new ones)."""
    samples = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: x\r\nAuthorization: y\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0;a=\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"M-SEARCH /a\n",
    ]
    excused = set()
    for data in samples:
        _, our_refusal, _ = ours(data, 0)
        _, their_refusal = llhttp(data, [])
        assert our_refusal is not None and their_refusal is None, data
        excused.update(reason for reason in WE_REFUSE if reason in our_refusal)
    assert excused == set(WE_REFUSE)
    our_messages, our_refusal, _ = ours(b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 0)
    _, their_refusal = llhttp(b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", [])
    assert our_refusal is None and "Invalid method encountered" in their_refusal
