# cython: language_level=3
"""Building the bytes the gateway sends upstream and back, compiled.

Headers are copied as raw bytes from the client's request, minus the
hop-by-hop ones and those the gateway sets itself; no str decoding per header.
"""

# Lower-cased names never copied to the upstream request.
cdef frozenset _REQUEST_SKIP = frozenset([
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
    b"upgrade", b"host", b"content-length", b"authorization", b"expect", b"trailer",
])
# Lower-cased names never copied from the upstream response to the client.
cdef frozenset _RESPONSE_SKIP = frozenset([
    b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"content-type",
    b"x-request-id", b"date", b"server",
])


cpdef bytes request_head(bytes method, bytes target, list raw_headers, list extra):
    """Request line and headers without Host and the blank line.

    raw_headers: (name, value) bytes pairs as received; extra: (name, value)
    bytes pairs to add (request id, the rule's header, the target's token).
    """
    cdef list parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    cdef tuple pair
    cdef bytes name, lower
    # The gateway's own values replace the client's (request id, the rule's header).
    cdef set replaced = {(<bytes>pair[0]).lower() for pair in extra}
    for pair in raw_headers:
        name = pair[0]
        lower = name.lower()
        if lower in _REQUEST_SKIP or lower in replaced:
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(pair[1])
        parts.append(b"\r\n")
    for pair in extra:
        parts.append(pair[0])
        parts.append(b": ")
        parts.append(pair[1])
        parts.append(b"\r\n")
    return b"".join(parts)


cpdef bytes finish_request(bytes head, bytes host_line, bytes body):
    """head + Host + Content-Length + blank line + body, in one allocation."""
    return b"".join([head, host_line, b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n",
                     body])


cpdef tuple response_headers(list raw_headers):
    """(content type str, pass-through header lines bytes) of an upstream response."""
    cdef list parts = []
    cdef tuple pair
    cdef bytes name, lower
    content_type = "application/octet-stream"
    for pair in raw_headers:
        name = pair[0]
        lower = name.lower()
        if lower == b"content-type":
            content_type = (<bytes>pair[1]).decode("latin-1")
            continue
        if lower in _RESPONSE_SKIP:
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(pair[1])
        parts.append(b"\r\n")
    return content_type, b"".join(parts)
