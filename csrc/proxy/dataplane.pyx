# cython: language_level=3
"""The gateway's data plane in C: sockets, HTTP framing and plain forwarding, no interpreter.

Why: under asyncio every request costs the interpreter about 45 us on this
machine (protocol callbacks, httptools callbacks per header, Request,
Exchange, Future and Response objects, bytes joins): infergate ran at about
half of nginx. A featureless 60-line uvloop + httptools proxy reached only
0.85x nginx, so the protocol layer itself is the bound; a featureless C epoll
proxy reached 1.28x (bench/proxy numbers in README.md).

How: one epoll set of its own, polled from the gateway's event loop
(`loop.add_reader` on the epoll fd): a batch of socket events costs one Python
call, and everything in it runs here. Client connections are accepted,
read, parsed and written here. A request for a service whose route needs
nothing but a raw-token check, header rules and version and instance choice
(no rate limits) is forwarded here too, on keep-alive upstream connections of
its own, with the same retries, deadlines, headers and metrics as the Python
forwarder. Every other request (admin API, discovery, metrics, signatures,
rate limits, anything unusual) becomes a `Request` for the gateway's Python
handler, exactly as gateway/server/http.py would make it, on the same loop:
control stays in Python and runs when configuration changes, not per request.

Requests on one connection are answered in order, one at a time (a pipelined
request is parsed once the one before it is answered). The HTTP/1.1 codec itself
(heads, chunked bodies, and their limits) is http1.pyx.
"""
import logging
import os
import socket as _socket
import struct as _struct
import time

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free

from gateway._native.chain cimport RouteTarget, route_target
from gateway._native.counters cimport Series
from gateway._native.http1 cimport (
    CHUNKS_MORE, E_CHUNK_TOO_LARGE, HEAD_MORE, MAX_INTERIM, Buf, Chunks, Head, Span, buf_add,
    buf_bytes, buf_consume, buf_need, chunks_refusal, chunks_start, dechunk, head_refusal,
    head_refusal_status, parse_head, span_is)
from gateway._native.httpcore cimport (MAX_HEAD, MAX_HEADERS, Request, Response,
                                       answer_exception, error_response, status_line)
from gateway._native.picker cimport SmoothWeightedPicker

cdef extern from "string.h" nogil:
    int strncasecmp(const char*, const char*, size_t)
cdef extern from "stdio.h" nogil:
    int snprintf(char*, size_t, const char*, ...)
cdef extern from "unistd.h" nogil:
    ssize_t read(int, void*, size_t)
    int close(int)
cdef extern from "time.h" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int, timespec*)
    enum: CLOCK_MONOTONIC

cdef extern from "errno.h" nogil:
    int errno
    enum: EAGAIN, EINPROGRESS, EINTR, EMFILE, ENFILE
cdef extern from "sys/socket.h" nogil:
    ssize_t send(int, const void*, size_t, int)
    int socket(int, int, int)
    int accept4(int, void*, void*, int)
    int connect(int, const void*, unsigned int)
    int setsockopt(int, int, int, const void*, unsigned int)
    int getsockopt(int, int, int, void*, unsigned int*)
    ssize_t recv(int, void*, size_t, int)
    int shutdown(int, int)
    enum: SHUT_WR
    enum: AF_INET, SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC, MSG_NOSIGNAL, SOL_SOCKET, SO_ERROR
    enum: MSG_PEEK, MSG_DONTWAIT
cdef extern from "netinet/in.h" nogil:
    struct in_addr:
        unsigned int s_addr
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    enum: IPPROTO_TCP
    unsigned short htons(unsigned short)
    unsigned short ntohs(unsigned short)
cdef extern from "arpa/inet.h" nogil:
    int inet_pton(int, const char*, void*)
    const char* inet_ntop(int, const void*, char*, unsigned int)
cdef extern from "netinet/tcp.h" nogil:
    enum: TCP_NODELAY
cdef extern from "sys/epoll.h" nogil:
    union epoll_data_t:
        void* ptr
        int fd
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int)
    int epoll_ctl(int, int, int, epoll_event*)
    int epoll_wait(int, epoll_event*, int, int)
    enum: EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CTL_DEL
    enum: EPOLL_CLOEXEC

log = logging.getLogger("infergate.dataplane")

DEF READ_CHUNK = 65536
DEF MAX_TRIES = 3
DEF DRAIN_IDLE_GRACE = 1.0  # seconds an idle keep-alive connection stays open on shutdown
DEF LINGER = 2.0  # seconds a closing connection's unread request bytes are still read away
# Outlier detection (Envoy's consecutive gateway failures, and a check of our own for a hung
# instance): see Instance.
DEF CONSECUTIVE_FAILURES = 5
DEF STALL_FLOOR = 0.5    # seconds
DEF STALL_FACTOR = 10.0  # times the instance's usual latency

cdef inline double monotonic() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef bytes CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef bytes _ID_PREFIX = os.urandom(8).hex().encode()  # as the chain's request ids
cdef unsigned long long _id_counter = 0
cdef object _perf_counter = time.perf_counter


cdef int add_target(Buf* s, bytes prefix, const char* subpath, Py_ssize_t subpath_n,
                    const char* query, Py_ssize_t query_n) except -1:
    """The upstream request target: the backend's prefix (kept without a trailing slash),
    the subpath (not a lone "/"), the query when not empty; "/" when all are empty."""
    cdef size_t at = s.n
    buf_bytes(s, prefix)
    if subpath_n > 1:
        buf_add(s, subpath, subpath_n)
    if s.n == at:
        buf_add(s, b"/", 1)
    if query_n > 1:
        buf_add(s, query, query_n)
    return 0


# --- connections --------------------------------------------------------------------------

cdef class Conn:
    cdef int fd
    cdef Buf inb, outb
    cdef bint closed, want_out

    def __dealloc__(self):
        free(self.inb.p)
        free(self.outb.p)


cdef class Client(Conn):
    cdef DataPlane plane
    cdef object peer
    cdef object working          # the Python handler's Future while it works, or a Flight
    cdef bint in_message, closing
    cdef bint dispatching        # _serve is handing a request on (answers may come at once)
    cdef double last_activity, message_started
    cdef bytes log_method, log_target  # the request being answered, for the access log
    # The request being read, once its head is accepted: where its body starts (0: no head
    # yet), its Content-Length, or its chunked body's decoding so far.
    cdef size_t body_at
    cdef long long body_length
    cdef bint chunked
    cdef Chunks chunks
    cdef Py_ssize_t reserved     # bytes of the plane's body budget this request holds
    # Clients with no request in flight, in the order of their last progress (the oldest
    # is the one eviction closes): accepted, a read while idle, a new request begun.
    cdef Client older, newer
    cdef bint listed
    cdef double linger_until     # answered and half-closed: reading away what it still sends


cdef class Upstream(Conn):
    cdef Instance instance
    cdef Flight flight
    cdef bint connecting
    cdef bint reused     # taken from the idle ones (the instance may have just closed it)
    cdef double connect_by
    cdef Head head
    cdef int interim     # 1xx answers skipped for the request in flight
    cdef Chunks chunks   # a chunked answer's decoding so far


cdef class Instance:
    """One ip:port the data plane forwards to, with its idle keep-alive connections.

    And what outlier detection reads. An instance is ejected (the `ejected` callback marks
    it down for a while; its requests already sent go on) after CONSECUTIVE_FAILURES
    failures in a row (refused or reset connections, 502-504, timeouts), or when it
    stalls: it holds a request, and has answered nothing, for STALL_FACTOR times its usual
    latency (STALL_FLOOR seconds at least). Its usual latency is known once it has answered
    (a slow model's first request is no stall). A stopped or deadlocked process still accepts
    connections (the kernel's backlog), so a connect check never sees it, and a request
    timeout of seconds sees it only after every client is stuck on it.
    """
    cdef bytes host_line
    cdef bytes sockaddr  # a struct sockaddr_in or sockaddr_in6, as connect() takes it
    cdef int family
    cdef str unresolved  # why the address could not be resolved, or None
    cdef list idle
    cdef list waiting    # Flights waiting for a connection (max_connections are open)
    cdef int open, max_connections
    cdef double connect_timeout
    cdef str where, ip
    cdef int port
    cdef bint retired    # left the route table: its connections close when done
    cdef int failures              # in a row
    cdef double answered_at        # monotonic() of its last answer
    cdef double latency            # its usual latency: a moving average of good answers
    cdef double ejected_until      # not judged again before this

    def __init__(self, str ip, int port, int max_connections=256, double connect_timeout=2.0):
        self.host_line = f"Host: {ip}:{port}\r\n".encode()
        self.idle = []
        self.waiting = []
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.where = f"{ip}:{port}"
        self.ip = ip
        self.port = port
        self.resolve(ip, port)

    cdef void resolve(self, str ip, int port) except *:
        """The address to connect to (a host name is resolved now, when configured)."""
        try:
            family, _, _, _, address = _socket.getaddrinfo(ip, port, type=_socket.SOCK_STREAM)[0]
        except (OSError, UnicodeError) as exc:
            self.unresolved = f"cannot resolve {ip}: {exc}"
            return
        if family == _socket.AF_INET6:
            self.sockaddr = (_struct.pack("=H", family) + _struct.pack(">HI", port, address[2]) +
                             _socket.inet_pton(family, address[0]) +
                             _struct.pack("=I", address[3]))
        else:
            self.sockaddr = (_struct.pack("=H", family) + _struct.pack(">H", port) +
                             _socket.inet_pton(family, address[0]) + bytes(8))
        self.family = family
        self.unresolved = None


cdef class FastRoute:
    """What the data plane needs of a route it may forward by itself."""
    cdef object route          # gateway.routing.table.Route
    cdef str name
    cdef bytes token           # b"" when the service has none
    cdef object ruleset        # the route's RuleSet, or None
    cdef tuple rule_headers    # (lower-cased name bytes, str) of the headers the rules read
    cdef tuple limit_headers   # the same for the headers rate limits are keyed by
    cdef bint limited          # the route has rate limits: the limiter decides first
    cdef bint callers          # the route has identified callers (their tokens: the chain)
    cdef dict series           # backend -> the metrics Series of (service, version)


cdef class LimitView:
    """What a rate-limit filter reads of a request (gateway/ratelimit/filter.py takes it
    for an Exchange): the route, the client, the headers limits are keyed by, and the
    headers the filter adds to the answer."""
    cdef public object route, peer
    cdef public str service
    cdef public dict headers
    cdef public list response_headers

    @property
    def request(self):
        return self


cdef class Flight:
    """One request forwarded by the data plane: tries, deadline, and whom to answer."""
    cdef Client client
    cdef Series series
    cdef object backend
    cdef SmoothWeightedPicker picker
    cdef list instances
    cdef bytes head, body
    cdef str service
    cdef bytes request_id
    cdef tuple tried
    cdef int tries_left, index
    cdef double deadline, started
    cdef double sent_at           # monotonic() when this try was sent
    cdef double try_timeout       # seconds a try may take while another try is left; 0: no limit
    cdef bint keep_alive
    cdef bint no_body    # a HEAD request: the answer has no body, whatever its length says
    cdef Upstream conn
    cdef object failed_answer, failed_transport
    cdef object exchange, on_finish, future  # a request of the Python chain
    cdef list response_headers  # (str, str) a filter adds to the answer (rate limits)


cdef class DataPlane:
    """Serves a listening socket: fast routes here, everything else through `handler`."""

    cdef int ep
    cdef object listener, loop, handler, answer_error, series_for, retried, limiter
    cdef public object ejected      # ejected(ip, port, why) -> seconds it is out (0: kept)
    cdef public object access_log   # access_log(peer, method, target, status, bytes, seconds)
    # Another server whose connections count against max_connections with ours (the
    # gateway's gRPC port, grpcwire.GrpcServer): len(others.connections), and
    # others.evict_idle() -> bool to make room.
    cdef public object others
    cdef list by_fd                 # fd -> Conn
    cdef dict fast                  # service bytes -> FastRoute
    cdef frozenset services         # every service's name (bytes) in the route table
    cdef dict instances             # (ip, port) -> Instance
    cdef dict backend_instances     # backend -> [Instance], one per pool
    cdef set flights
    cdef readonly set clients
    cdef Py_ssize_t max_body_size
    cdef Py_ssize_t max_response_size  # an instance's answer, buffered whole: at most this
    cdef double idle_timeout, read_timeout
    cdef readonly bint draining
    cdef object sweeper
    cdef long sweeps
    cdef Py_ssize_t max_clients
    cdef Client oldest, newest      # the clients eviction may close, least progress first
    # Request bodies buffered at most, all clients together (see _reserve).
    cdef readonly Py_ssize_t body_budget, body_bytes
    cdef Head head                  # scratch for request heads
    cdef Buf scratch
    cdef Buf out                    # a fast answer, built whole before it is sent
    cdef epoll_event events[256]

    def __init__(self, handler, series_for, retried, limiter=None, answer_error=None,
                 Py_ssize_t max_body_size=64 << 20, Py_ssize_t max_response_size=256 << 20,
                 double idle_timeout=75.0,
                 double read_timeout=30.0, Py_ssize_t max_connections=10000,
                 Py_ssize_t body_budget=1 << 30):
        self.listener = None
        # Request bodies are held whole, from their first byte until their request is
        # answered: together at most body_budget bytes. A request whose body would pass
        # it gets a 503 when its head comes (a declared length is reserved whole, a
        # chunked body as it arrives), rather than pausing reads: paused connections
        # would hold the budget until the read timeout and stall everyone behind them,
        # while a 503 at once is retried elsewhere.
        self.body_budget = max(body_budget, max_body_size)
        # Client connections at most: past it, a new one takes the place of the one that
        # has made the least progress (slowloris), so that file descriptors never run out.
        self.max_clients = max(1, max_connections)
        self.handler = handler
        self.series_for = series_for  # (service, version) -> its metrics Series
        self.retried = retried
        # The rate-limit filter: limiter.check(view) -> None | Response | awaitable of either
        # (a Filter, gateway/proxy/filter.py, over a LimitView); limiter.headers_of(route)
        # -> the header names its limits are keyed by.
        self.limiter = limiter
        self.ejected = None
        self.answer_error = answer_error
        self.max_body_size = max_body_size
        self.max_response_size = max_response_size
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.by_fd = []
        self.fast = {}
        self.services = frozenset()
        self.instances = {}
        self.flights = set()
        self.clients = set()
        self.draining = False
        self.backend_instances = {}
        self.ep = epoll_create1(EPOLL_CLOEXEC)
        if self.ep < 0:
            raise OSError(errno, "epoll_create1 failed")

    def listen(self, listener):
        """Serve clients on a listening socket.socket (kept: it owns the fd)."""
        listener.setblocking(False)
        self.listener = listener
        self._watch(listener.fileno(), None, EPOLLIN)

    def __dealloc__(self):
        if self.ep >= 0:
            close(self.ep)
        free(self.scratch.p)
        free(self.out.p)

    def start(self, loop):
        self.loop = loop
        loop.add_reader(self.ep, self._ready)
        self.sweeper = loop.call_later(0.05, self._sweep)

    # --- configuration (Python, on table changes) ----------------------------------------
    def set_routes(self, routes):
        """The route table changed: which services the data plane forwards by itself."""
        fast = {}
        keep = set()
        by_backend = {}
        for name, route in routes.items():
            backends = [b for b, _ in route.traffic] + [b for b, _ in route.rule_choices if b]
            for backend in backends:
                by_backend[backend] = [self._instance(pool) for pool in backend.pools]
                keep.update((pool.ip, pool.port) for pool in backend.pools)
            if route.rate_limits and self.limiter is None:
                continue  # the Python chain decides those, then hands them back here
            entry = FastRoute()
            entry.limited = bool(route.rate_limits)
            entry.limit_headers = tuple((n.encode("latin-1"), n) for n in
                                        self.limiter.headers_of(route)) if entry.limited else ()
            entry.route = route
            entry.name = name
            entry.token = route.token.encode("latin-1") if route.token else b""
            entry.callers = bool(route.callers)
            entry.ruleset = route.ruleset
            entry.rule_headers = tuple((n.encode("latin-1"), n) for n in
                                       route.ruleset.header_names) if route.ruleset else ()
            entry.series = {b: self.series_for(name, b.name) for b in backends}
            fast[name.encode("latin-1")] = entry
        self.fast = fast
        self.services = frozenset(name.encode("latin-1") for name in routes)
        self.backend_instances = by_backend
        for key in list(self.instances):
            if key not in keep:
                inst = <Instance>self.instances.pop(key)
                inst.retired = True
                for conn in inst.idle:
                    self._close(conn)

    cdef Instance _instance(self, pool):
        key = (pool.ip, pool.port)
        inst = self.instances.get(key)
        if inst is None:
            inst = self.instances[key] = Instance(pool.ip, pool.port, pool.max_connections,
                                                  pool.connect_timeout)
        elif (<Instance>inst).unresolved is not None:
            (<Instance>inst).resolve(pool.ip, pool.port)
        return inst

    # --- the loop ------------------------------------------------------------------------
    cdef void _watch(self, int fd, Conn conn, unsigned int events) except *:
        cdef epoll_event ev
        ev.events = events
        ev.data.fd = fd
        if conn is not None:
            while len(self.by_fd) <= fd:
                self.by_fd.append(None)
            self.by_fd[fd] = conn
        if epoll_ctl(self.ep, EPOLL_CTL_ADD, fd, &ev) != 0:
            raise OSError(errno, "epoll_ctl failed")

    cdef void _rewatch(self, Conn conn, bint out) noexcept:
        cdef epoll_event ev
        if conn.want_out == out:
            return
        conn.want_out = out
        ev.events = EPOLLIN | EPOLLOUT if out else EPOLLIN
        ev.data.fd = conn.fd
        epoll_ctl(self.ep, EPOLL_CTL_MOD, conn.fd, &ev)

    def _ready(self):
        cdef int n, i, fd
        cdef Conn conn
        cdef int lfd = self.listener.fileno() if self.listener is not None else -1
        while True:
            n = epoll_wait(self.ep, self.events, 256, 0)
            if n <= 0:
                return
            for i in range(n):
                fd = self.events[i].data.fd
                if fd == lfd:
                    self._accept(lfd)
                    continue
                if fd >= len(self.by_fd):
                    continue
                conn = self.by_fd[fd]
                if conn is None or conn.closed:
                    continue
                try:
                    if self.events[i].events & EPOLLOUT:
                        self._writable(conn)
                    if not conn.closed and self.events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP):
                        self._readable(conn)
                except Exception:
                    log.exception("data plane: a connection failed")
                    self._close(conn)
            if n < 256:
                return

    cdef void _accept(self, int lfd) except *:
        cdef int fd, one = 1
        cdef Client c
        cdef sockaddr_in addr
        cdef unsigned int addr_len
        cdef char ip[64]
        cdef double now = self.loop.time()
        while True:
            addr_len = sizeof(sockaddr_in)
            fd = accept4(lfd, &addr, &addr_len, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if (errno == EMFILE or errno == ENFILE) and self._evict():
                    continue  # out of descriptors anyway: make room, take the new one
                return
            if len(self.clients) + (len(self.others.connections) if self.others is not None
                                    else 0) >= self.max_clients and not self._evict():
                close(fd)  # every connection has a request in flight: none to give up
                continue
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
            c = Client()
            c.fd = fd
            c.plane = self
            c.last_activity = now
            if addr.sin_family == AF_INET and inet_ntop(AF_INET, &addr.sin_addr, ip, 64) != NULL:
                c.peer = ((<bytes>ip).decode(), ntohs(addr.sin_port))
            else:
                c.peer = None
            self.clients.add(c)
            self._list_newest(c)
            self._watch(fd, c, EPOLLIN)

    cdef bint _evict(self) except *:
        """Close the client connection that has made the least progress, of those with no
        request in flight: the one whose unfinished request began first (a slowloris
        sends its head a byte at a time), else the longest idle; failing those, an idle
        connection of `others`. False if none. The oldest of the list (_list_newest) is it:
        those in flight met on the way leave the list."""
        cdef Client c = self.oldest
        while c is not None:
            self._unlist(c)
            if c.working is None and not c.closed:
                self._close(c)
                return True
            c = self.oldest
        return self.others is not None and self.others.evict_idle()

    cdef void _readable(self, Conn conn) except *:
        cdef ssize_t got
        cdef size_t room
        # More than this buffered is refused below (read no further now).
        cdef size_t limit = <size_t>self.max_body_size + 2 * MAX_HEAD if type(conn) is Client \
            else <size_t>self.max_response_size + MAX_HEAD
        while True:
            buf_need(&conn.inb, READ_CHUNK)
            room = conn.inb.cap - conn.inb.n
            got = read(conn.fd, conn.inb.p + conn.inb.n, room)
            if got > 0:
                conn.inb.n += got
                if <size_t>got < room or conn.inb.n > limit:
                    break  # drained for now, or too much
                continue
            if got < 0 and (errno == EAGAIN or errno == EINTR):
                break
            # EOF or error
            if type(conn) is Client:
                self._close(conn)
            else:
                self._upstream_eof(<Upstream>conn, got < 0)
            return
        if type(conn) is Client and (<Client>conn).linger_until:
            conn.inb.n = 0
            return
        if type(conn) is Client:
            (<Client>conn).last_activity = self.loop.time()
            if not (<Client>conn).in_message:
                self._list_newest(<Client>conn)
            if conn.inb.n > limit:
                self._close(conn)  # more queued than one request may be: not a client's way
                return
            self._serve(<Client>conn)
        elif conn.inb.n > limit:
            self._too_large(<Upstream>conn)
        else:
            self._upstream_data(<Upstream>conn)

    cdef void _too_large(self, Upstream u) except *:
        """An answer past max_response_size: 502, not retried (another instance would
        answer as much), and the connection closed."""
        cdef Flight f = u.flight
        u.flight = None
        self._close(u)
        if f is not None and f.conn is u:
            f.conn = None
            self._finish(f, error_response(
                502, f"upstream {u.instance.where} answered more than the gateway's limit of "
                     f"{self.max_response_size >> 20} MB (--max-response-mb)"))

    cdef void _writable(self, Conn conn) except *:
        cdef ssize_t sent
        cdef int err = 0
        cdef unsigned int size = sizeof(int)
        if type(conn) is Upstream and (<Upstream>conn).connecting:
            getsockopt(conn.fd, SOL_SOCKET, SO_ERROR, &err, &size)
            (<Upstream>conn).connecting = False
            if err != 0:
                self._upstream_failed(<Upstream>conn, f"connect failed: {os.strerror(err)}")
                return
        if conn.outb.n:
            sent = send(conn.fd, conn.outb.p, conn.outb.n, MSG_NOSIGNAL)
            if sent < 0 and errno != EAGAIN and errno != EINTR:
                if type(conn) is Client:
                    self._close(conn)
                else:
                    self._upstream_failed(<Upstream>conn, f"send failed: {os.strerror(errno)}")
                return
            if sent > 0:
                buf_consume(&conn.outb, sent)
        if conn.outb.n == 0:
            self._rewatch(conn, False)
            if type(conn) is Client:
                client = <Client>conn
                if client.closing:
                    self._linger(client)
                else:
                    self._serve_next(client)

    cdef void _send(self, Conn conn, const char* p, size_t n) except *:
        """Write now what the socket takes; keep the rest for EPOLLOUT."""
        cdef ssize_t sent = 0
        if conn.outb.n == 0:
            sent = send(conn.fd, p, n, MSG_NOSIGNAL)
            if sent < 0:
                if errno != EAGAIN and errno != EINTR:
                    return  # the connection is gone: its read side tells
                sent = 0
        if <size_t>sent < n:
            buf_add(&conn.outb, p + sent, n - sent)
            self._rewatch(conn, True)

    cdef void _close(self, Conn conn) except *:
        if conn.closed:
            return
        conn.closed = True
        epoll_ctl(self.ep, EPOLL_CTL_DEL, conn.fd, NULL)
        close(conn.fd)
        if conn.fd < len(self.by_fd) and self.by_fd[conn.fd] is conn:
            self.by_fd[conn.fd] = None
        if type(conn) is Upstream:
            inst = (<Upstream>conn).instance
            inst.open -= 1
            self._next_waiting(inst, None)
        elif type(conn) is Client:
            client = <Client>conn
            self.clients.discard(client)
            self._unlist(client)
            self._unreserve(client)
            working = client.working
            client.working = None
            if working is not None and not isinstance(working, Flight):
                working.cancel()  # the handler's work, for a client that left
            elif working is not None:
                self._abandon(<Flight>working)

    # --- client requests -----------------------------------------------------------------
    cdef void _serve(self, Client c) except *:
        """Parse and answer the next request of `c`, if it has one and nothing is in flight.
        Its head is judged once (_accept_head); its body is then awaited, a chunked one
        decoded as it comes."""
        cdef Head* h = &self.head
        cdef int rc
        cdef size_t body_end
        cdef bytes body
        cdef bint parsed  # h is this request's head, parsed in this call
        cdef const char* parsed_over  # the buffer h was parsed over
        if c.dispatching:
            return  # the _serve below us goes on once the request is consumed
        if not c.listed:
            self._list_newest(c)  # its answer is out: it may be evicted again
        if c.working is None and not c.in_message:
            self._unreserve(c)  # its last request is answered: its body is let go
        while c.working is None and not c.closing and c.outb.n == 0 and c.inb.n and \
                not c.closed:
            if not c.in_message:
                self._unreserve(c)
                c.in_message = True
                c.message_started = self.loop.time()
                self._list_newest(c)
            parsed = c.body_at == 0
            parsed_over = c.inb.p
            if parsed and not self._accept_head(c, h):
                return
            if c.chunked:
                rc = dechunk(c.inb.p + c.body_at, c.inb.n - c.body_at, &c.chunks,
                             self.max_body_size)
                if rc == CHUNKS_MORE:
                    self._reserve(c, c.inb.n - c.body_at)
                    return
                if rc < 0:
                    self._answer(c, self._too_large_body() if rc == E_CHUNK_TOO_LARGE else
                                 error_response(400, "malformed HTTP request: " +
                                                chunks_refusal(rc)), False)
                    return
                body = PyBytes_FromStringAndSize(c.inb.p + c.body_at, c.chunks.write_at)
                body_end = c.body_at + c.chunks.read_at
            else:
                body_end = c.body_at + c.body_length
                if body_end > c.inb.n:
                    self._reserve(c, c.inb.n - c.body_at)  # (past the budget: a 503)
                    return
                body = PyBytes_FromStringAndSize(c.inb.p + c.body_at, c.body_length)
            if not parsed or c.inb.p != parsed_over:  # h's spans point into the buffer, which
                parse_head(c.inb.p, c.body_at, h, False)  # moves as it grows (_accept_head too)
            c.body_at = 0
            keep_alive = (not h.conn_close if h.minor == 1 else h.conn_keep_alive) and \
                not self.draining
            c.in_message = False
            if self.access_log is not None:
                c.log_method = PyBytes_FromStringAndSize(h.method.p, h.method.n)
                c.log_target = PyBytes_FromStringAndSize(h.target.p, h.target.n)
            c.dispatching = True
            try:
                if h.method.n == 4 and strncasecmp(h.method.p, b"HEAD", 4) == 0 or \
                        not self._forward(c, h, body, keep_alive):
                    self._hand_over(c, h, body, keep_alive)
            finally:
                c.dispatching = False
                buf_consume(&c.inb, body_end)
                if c.working is None:
                    self._unreserve(c)  # answered at once

    cdef bint _accept_head(self, Client c, Head* h) except *:
        """Parse the head of the request `c` is sending, and judge what can be judged before
        its body: False when more bytes are needed or it was refused (answered)."""
        cdef int rc = parse_head(c.inb.p, c.inb.n, h, False)
        if rc == HEAD_MORE:
            return False
        if rc < 0:
            self._answer(c, error_response(head_refusal_status(rc), head_refusal(rc)), False)
            return False
        if h.content_length > self.max_body_size:
            self._answer(c, self._too_large_body(), False)
            return False
        cdef bint body_to_come = h.chunked or h.size + max(h.content_length, 0) > c.inb.n
        if body_to_come and self._refuse_unknown(c, h):
            return False  # (its body is not read: the connection closes)
        # Bodies hold the budget as their bytes arrive, not as their heads declare them: a
        # head costs a few bytes to send, a held byte of budget one byte.
        if not self._reserve(c, c.inb.n - h.size if h.chunked else
                             min(c.inb.n - h.size, max(h.content_length, 0))):
            return False
        c.body_at = h.size
        c.chunked = h.chunked
        c.body_length = max(h.content_length, 0)
        if c.body_length > READ_CHUNK:  # room for the declared body at once, not by doubling
            buf_need(&c.inb, c.body_at + c.body_length + READ_CHUNK - c.inb.n)
        if h.chunked:
            chunks_start(&c.chunks)
        if body_to_come and h.expect_continue and h.minor == 1 and c.inb.n == h.size:
            self._send(c, PyBytes_AS_STRING(CONTINUE_100), PyBytes_GET_SIZE(CONTINUE_100))
        return True

    cdef Response _too_large_body(self):
        return error_response(413, f"request body is larger than the limit of "
                                   f"{self.max_body_size} bytes")

    cdef bint _refuse_unknown(self, Client c, Head* h) except *:
        """A request for a service the route table does not have: its 404 now, before its
        body is read (as the chain would answer it)."""
        cdef RouteTarget t
        if route_target(h.target.p, h.target.n, &t) != 1:
            return False
        name = PyBytes_FromStringAndSize(t.service, t.service_n)
        if name in self.services:
            return False
        response = error_response(404, f"unknown service {name.decode('latin-1')!r}")
        self._decorate(response, self._request_id(h), None)
        self.series_for("_unknown", "").observe(404, 0.0, 0, len(response.body))
        self._answer(c, response, False)
        return True

    cdef bint _reserve(self, Client c, Py_ssize_t size) except *:
        """Hold `size` bytes of the request-body budget for the request `c` is sending (it
        held c.reserved so far), until it is answered; past the budget, a 503 and False."""
        if size <= c.reserved:
            return True
        if not self.take_body_budget(size - c.reserved):
            self._answer(c, error_response(
                503, f"the gateway holds as many request bodies as it may "
                     f"({self.body_budget >> 20} MB, --max-buffered-body-mb): retry later"),
                False)
            return False
        c.reserved = size
        return True

    cdef inline void _unreserve(self, Client c) noexcept:
        self.give_body_budget(c.reserved)
        c.reserved = 0

    cpdef bint take_body_budget(self, Py_ssize_t size) noexcept:
        """Hold `size` more bytes of the request-body budget, the gateway's one for every
        protocol (a gRPC front counts its bodies here too): False, holding nothing, past
        it. give_body_budget hands them back."""
        if self.body_bytes + size > self.body_budget:
            return False
        self.body_bytes += size
        return True

    cpdef void give_body_budget(self, Py_ssize_t size) noexcept:
        self.body_bytes -= size

    cdef void _unlist(self, Client c) noexcept:
        if not c.listed:
            return
        if c.older is None:
            self.oldest = c.newer
        else:
            c.older.newer = c.newer
        if c.newer is None:
            self.newest = c.older
        else:
            c.newer.older = c.older
        c.older = c.newer = None
        c.listed = False

    cdef void _list_newest(self, Client c) noexcept:
        """`c` made progress now: last in eviction's order (unless it has a request in
        flight: it is listed again once that is answered)."""
        if c.working is not None or c.closed or c is self.newest:
            return
        self._unlist(c)
        c.older = self.newest
        if self.newest is None:
            self.oldest = c
        else:
            self.newest.newer = c
        self.newest = c
        c.listed = True

    cdef void _log(self, Client c, int status, size_t length) except *:
        """One line of the access log: the request being answered (or "-" for one that
        could not be read), its status, the answer's body size and the time it took."""
        try:
            self.access_log(c.peer, c.log_method or b"-", c.log_target or b"-", status, length,
                            self.loop.time() - c.message_started)
        except Exception:
            log.exception("access log failed")
        c.log_method = c.log_target = None

    cdef void _serve_next(self, Client c) except *:
        """_serve after an answer went out, from another connection's event or a callback:
        a failure there is this client's, not the caller's connection's."""
        try:
            self._serve(c)
        except Exception:
            log.exception("data plane: serving a client failed")
            self._close(c)

    cdef void _answer(self, Client c, Response response, bint keep_alive,
                      bint no_body=False) except *:
        if c.closed:
            return
        if self.draining:
            keep_alive = False  # say so, rather than closing under a client that reuses it
        if self.access_log is not None:
            self._log(c, response.status, len(response.body))
        cdef bytes head = response.head(keep_alive)
        cdef bytes body = response.body if not no_body else b""
        if PyBytes_GET_SIZE(body) < 65536:  # one write, one syscall
            self.scratch.n = 0
            buf_bytes(&self.scratch, head)
            buf_bytes(&self.scratch, body)
            self._send(c, self.scratch.p, self.scratch.n)
        else:
            self._send(c, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
            self._send(c, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        if not keep_alive:
            c.closing = True
            if c.outb.n == 0:
                self._linger(c)

    # --- the Python handler (everything the data plane does not forward itself) ----------
    cdef void _hand_over(self, Client c, Head* h, bytes body, bint keep_alive) except *:
        cdef dict headers = {}
        cdef list raw = []
        cdef int i
        for i in range(h.count):
            name = PyBytes_FromStringAndSize(h.names[i].p, h.names[i].n)
            value = PyBytes_FromStringAndSize(h.values[i].p, h.values[i].n)
            raw.append((name, value))
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        url = PyBytes_FromStringAndSize(h.target.p, h.target.n).decode("latin-1")
        path, _, query = url.partition("?")
        method = PyBytes_FromStringAndSize(h.method.p, h.method.n).decode("latin-1")
        request = Request(method, path, query, headers, raw, body, c.peer, keep_alive)
        try:
            response = self.handler(request)
        except Exception as exc:
            response = self._error(exc, request)
        if isinstance(response, Response):
            self._answer(c, response, keep_alive, method == "HEAD")
            return
        if not hasattr(response, "add_done_callback"):
            response = self.loop.create_task(response)
        c.working = response
        response.add_done_callback(_Parked(self, c, request, keep_alive))

    cdef void _parked_done(self, Client c, done, request, bint keep_alive) except *:
        if c.working is done:
            c.working = None
        if done.cancelled() or c.closed:
            return
        exc = done.exception()
        response = self._error(exc, request) if exc is not None else done.result()
        self._answer(c, response, keep_alive, request.method == "HEAD")
        if not c.closed:
            self._serve_next(c)

    cdef Response _error(self, exc, request):
        return answer_exception(self.answer_error, exc, request)

    # --- forwarding ------------------------------------------------------------------------
    cdef bint _forward(self, Client c, Head* h, bytes body, bint keep_alive) except *:
        """Forward a request of a fast route from here; False: the Python handler takes it."""
        global _id_counter
        cdef RouteTarget t
        if route_target(h.target.p, h.target.n, &t) <= 0:
            return False  # (one that could leave its service: the chain answers 400)
        entry = self.fast.get(PyBytes_FromStringAndSize(t.service, t.service_n))
        if entry is None:
            return False
        cdef FastRoute fast = <FastRoute>entry
        cdef int i
        cdef int auth = -1
        for i in range(h.count):
            if span_is(h.names[i], b"authorization", 13):
                auth = i
        if fast.callers and not fast.token:
            return False  # only identified callers' tokens: the Python chain checks them
        if fast.token:  # (another token, an identified caller's included: the chain's)
            if auth < 0 or h.values[auth].n != <size_t>PyBytes_GET_SIZE(fast.token) or \
                    memcmp_ct(h.values[auth].p, PyBytes_AS_STRING(fast.token),
                              h.values[auth].n) != 0:
                return False  # a signature, or no token: the Python chain answers
        if fast.limited:
            view = LimitView()
            view.route = fast.route
            view.peer = c.peer
            view.service = fast.name
            view.headers = self._values(h, fast.limit_headers)
            view.response_headers = []
            result = self.limiter.check(view)
            if result is not None:
                if isinstance(result, Response):
                    self._refuse(c, h, fast, result, view.response_headers, keep_alive)
                    return True
                # The limiter must ask Redis: park the request until it says.
                task = self.loop.create_task(_awaited(result))
                c.working = task
                task.add_done_callback(_Limited(
                    self, c, fast, PyBytes_FromStringAndSize(c.inb.p, h.size), body,
                    keep_alive, view))
                return True
            self._route_and_send(c, h, body, keep_alive, fast, view.response_headers)
            return True
        self._route_and_send(c, h, body, keep_alive, fast, None)
        return True

    cdef dict _values(self, Head* h, tuple wanted_headers):
        """{lower-cased name: value} of the wanted headers the request has."""
        cdef dict values = {}
        cdef bytes wanted
        cdef int i
        for wanted, key in wanted_headers:
            for i in range(h.count):
                if h.names[i].n == <size_t>PyBytes_GET_SIZE(wanted) and strncasecmp(
                        h.names[i].p, PyBytes_AS_STRING(wanted), h.names[i].n) == 0:
                    values[key] = PyBytes_FromStringAndSize(
                        h.values[i].p, h.values[i].n).decode("latin-1")
        return values

    cdef bytes _request_id(self, Head* h):
        """The client's X-Request-Id, else a new one (as the chain makes them)."""
        global _id_counter
        cdef int i
        cdef char id_buf[40]
        for i in range(h.count):
            if span_is(h.names[i], b"x-request-id", 12) and h.values[i].n:
                return PyBytes_FromStringAndSize(h.values[i].p, h.values[i].n)
        _id_counter += 1
        snprintf(id_buf, 40, b"%s%016llx", PyBytes_AS_STRING(_ID_PREFIX), _id_counter)
        return PyBytes_FromStringAndSize(id_buf, 32)

    cdef void _refuse(self, Client c, Head* h, FastRoute fast, Response response, list added,
                      bint keep_alive) except *:
        """Answer now, before any version is chosen (a rate limit's 429, a 503)."""
        self._decorate(response, self._request_id(h), added)
        self.series_for(fast.name, "").observe(response.status, 0.0, 0,
                                               len(response.body))
        self._answer(c, response, keep_alive)

    cdef void _decorate(self, Response response, bytes rid, list added) except *:
        """The request id and the filters' headers on an answer, as the chain adds them."""
        cdef list lines = [b"X-Request-Id: ", rid, b"\r\n"]
        if added:
            for name, value in added:
                lines += [(<str>name).encode("latin-1"), b": ", (<str>value).encode("latin-1"),
                          b"\r\n"]
        headers = response.headers
        if headers is None:
            response.headers = b"".join(lines)
        elif isinstance(headers, bytes):
            response.headers = headers + b"".join(lines)
        else:
            response.headers = b"".join(
                [f"{n}: {v}\r\n".encode("latin-1") for n, v in headers] + lines)

    cdef void _limited_done(self, Client c, FastRoute fast, bytes head, bytes body,
                            bint keep_alive, LimitView view, task) except *:
        cdef Head h
        if c.working is task:
            c.working = None
        if task.cancelled() or c.closed:
            return
        parse_head(PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head), &h, False)
        exc = task.exception()
        if exc is not None:
            log.error("a rate limit failed on %s", fast.name, exc_info=exc)
            result = error_response(500, "internal error")
        else:
            result = task.result()
        if result is not None:
            self._refuse(c, &h, fast, result, view.response_headers, keep_alive)
        else:
            self._route_and_send(c, &h, body, keep_alive, fast, view.response_headers)
        if not c.closed and c.working is None:
            self._serve_next(c)

    cdef void _route_and_send(self, Client c, Head* h, bytes body, bint keep_alive,
                              FastRoute fast, list added) except *:
        """Version and instance choice, then off to the instance (the chain's Version filter
        and forward, compiled)."""
        cdef RouteTarget t
        route_target(h.target.p, h.target.n, &t)
        route = fast.route
        extra = None
        backend = None
        if t.version_n:  # a v2 path naming one of the service's versions
            backend = route.versions.get(
                PyBytes_FromStringAndSize(t.version, t.version_n).decode("latin-1"))
        if backend is None and fast.ruleset is not None:  # Route.choose, on the rules' headers
            index = fast.ruleset.match(self._values(h, fast.rule_headers))
            if index >= 0:
                backend, extra = route.rule_choices[index]
        if backend is None:
            backend = route.traffic_picker.pick()
            extra = None
        if backend is None:
            self._refuse(c, h, fast, error_response(
                503, f"service {fast.name!r} has no version taking traffic"), added, keep_alive)
            return
        if not backend.pools:
            state = "stopped" if backend.status == "Stopped" else "has no instances"
            self._refuse(c, h, fast, error_response(
                503, f"service {backend.name!r} {state}"), added, keep_alive)
            return
        instances = self.backend_instances.get(backend)
        if instances is None:
            instances = self.backend_instances[backend] = [self._instance(p)
                                                           for p in backend.pools]
        rid = self._request_id(h)
        cdef Buf* s = &self.scratch
        s.n = 0
        buf_add(s, h.method.p, h.method.n)
        buf_add(s, b" ", 1)
        cdef const char* tend = h.target.p + h.target.n
        add_target(s, backend.prefix, t.subpath, t.path_end - t.subpath, t.path_end,
                   tend - t.path_end)
        extras = [extra] if extra is not None else []
        self._head_rest(s, h.names, h.values, h.count, extras, rid, backend)
        f = self._flight(backend, instances, body, fast.name, rid)
        f.client = c
        f.series = fast.series.get(backend) or self.series_for(fast.name, backend.name)
        f.keep_alive = keep_alive
        f.response_headers = added
        c.working = f
        self._attempt(f)

    cpdef object forward_exchange(self, ex, on_finish):
        """Forward an Exchange the Python chain let through (csrc/proxy/chain.pyx): a Future
        of on_finish(ex, the answer)."""
        backend = ex.backend
        request = ex.request
        instances = self.backend_instances.get(backend)
        if instances is None:  # a table newer than this plane's: rare, and brief
            instances = self.backend_instances[backend] = [self._instance(p)
                                                           for p in backend.pools]
        rid = (<str>ex.request_id).encode("latin-1")
        cdef Buf* s = &self.scratch
        s.n = 0
        buf_bytes(s, (<str>request.method).encode("latin-1"))
        buf_add(s, b" ", 1)
        cdef bytes subpath = (<str>ex.subpath).encode("latin-1")
        cdef bytes query = ("?" + request.query).encode("latin-1") if request.query else b""
        add_target(s, backend.prefix, subpath, len(subpath), query, len(query))
        cdef list raw = request.raw_headers
        cdef int count = min(len(raw), MAX_HEADERS), i
        cdef Span names[MAX_HEADERS]
        cdef Span values[MAX_HEADERS]
        for i in range(count):  # spans over the bytes in `raw`, alive through this call
            pair = raw[i]
            names[i].p = PyBytes_AS_STRING(pair[0])
            names[i].n = PyBytes_GET_SIZE(pair[0])
            values[i].p = PyBytes_AS_STRING(pair[1])
            values[i].n = PyBytes_GET_SIZE(pair[1])
        self._head_rest(s, names, values, count, ex.extra, rid, backend)
        f = self._flight(backend, instances, request.body, ex.service, rid)
        f.no_body = request.method == "HEAD"
        f.exchange = ex
        f.on_finish = on_finish
        f.future = self.loop.create_future()
        f.future.add_done_callback(_Abandoned(self, f))
        self._attempt(f)
        return f.future

    cdef void _head_rest(self, Buf* s, Span* names, Span* values, int count, list extras,
                         bytes rid, backend) except *:
        """The upstream request head after the target, without Host and Content-Length:
        the client's headers but hop-by-hop ones and those the gateway sets, then the
        gateway's (a rule's header, the request id, the instance's token)."""
        cdef int i, k
        cdef bytes extra_name
        buf_add(s, b" HTTP/1.1\r\n", 11)
        for i in range(count):
            if skip_request_header(names[i]):
                continue
            for k in range(len(extras)):
                extra_name = (<tuple>extras[k])[0]
                if names[i].n == <size_t>PyBytes_GET_SIZE(extra_name) and strncasecmp(
                        names[i].p, PyBytes_AS_STRING(extra_name), names[i].n) == 0:
                    break
            else:
                buf_add(s, names[i].p, names[i].n)
                buf_add(s, b": ", 2)
                buf_add(s, values[i].p, values[i].n)
                buf_add(s, b"\r\n", 2)
        for extra in extras:
            buf_bytes(s, (<tuple>extra)[0])
            buf_add(s, b": ", 2)
            buf_bytes(s, (<tuple>extra)[1])
            buf_add(s, b"\r\n", 2)
        buf_add(s, b"X-Request-Id: ", 14)
        buf_bytes(s, rid)
        buf_add(s, b"\r\n", 2)
        auth_header = backend.auth_header
        if auth_header is not None:
            buf_bytes(s, (<tuple>auth_header)[0])
            buf_add(s, b": ", 2)
            buf_bytes(s, (<tuple>auth_header)[1])
            buf_add(s, b"\r\n", 2)

    cdef Flight _flight(self, backend, list instances, bytes body, str service, bytes rid):
        f = Flight()
        f.backend = backend
        f.picker = backend.picker
        f.instances = instances
        f.head = PyBytes_FromStringAndSize(self.scratch.p, self.scratch.n)
        f.body = body
        f.service = service
        f.request_id = rid
        f.tried = ()
        f.tries_left = min(MAX_TRIES, len(backend.pools))
        f.try_timeout = backend.try_timeout
        f.index = -1
        f.started = _perf_counter()
        f.deadline = self.loop.time() + backend.timeout
        self.flights.add(f)
        return f

    cdef void _attempt(self, Flight f) except *:
        cdef int index = f.picker.pick_index(f.tried) if f.tries_left > 0 else -1
        if index < 0:
            self._finish(f, f.failed_answer or f.failed_transport or error_response(
                503, f"service {f.backend.name!r} has no healthy instance"))
            return
        f.tries_left -= 1
        f.tried += (index,)
        f.index = index
        cdef Instance inst = f.instances[index]
        cdef Upstream u
        while inst.idle:
            u = inst.idle.pop()
            if not u.closed:
                u.reused = True
                self._send_upstream(f, u)
                return
        if inst.open >= inst.max_connections:
            inst.waiting.append(f)  # the next connection freed on it goes to f
            return
        self._connect(f, inst)

    cdef void _connect(self, Flight f, Instance inst) except *:
        cdef Upstream u
        if inst.unresolved is not None:
            self._failed(f, inst.unresolved)
            return
        u = Upstream()
        u.instance = inst
        u.connect_by = self.loop.time() + inst.connect_timeout
        inst.open += 1
        u.fd = socket(inst.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        cdef int one = 1
        setsockopt(u.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
        if connect(u.fd, <const sockaddr_in*>PyBytes_AS_STRING(inst.sockaddr),
                   PyBytes_GET_SIZE(inst.sockaddr)) != 0 \
                and errno != EINPROGRESS:
            close(u.fd)
            u.closed = True
            inst.open -= 1
            self._failed(f, f"connect failed: {os.strerror(errno)}")
            self._next_waiting(inst, None)
            return
        u.connecting = True
        self._watch(u.fd, u, EPOLLIN | EPOLLOUT)
        u.want_out = True
        self._send_upstream(f, u)

    cdef void _send_upstream(self, Flight f, Upstream u) except *:
        f.conn = u
        f.sent_at = monotonic()
        u.flight = f
        u.inb.n = 0
        u.interim = 0
        chunks_start(&u.chunks)
        cdef Buf* s = &self.scratch
        s.n = 0
        buf_bytes(s, f.head)
        buf_bytes(s, u.instance.host_line)
        cdef char length[48]
        buf_add(s, length, snprintf(length, 48, b"Content-Length: %zd\r\n\r\n",
                                    PyBytes_GET_SIZE(f.body)))
        cdef bint whole = PyBytes_GET_SIZE(f.body) < 65536  # one write, one syscall
        if whole:
            buf_bytes(s, f.body)
        if u.connecting:  # sent once connected
            buf_add(&u.outb, s.p, s.n)
            if not whole:
                buf_bytes(&u.outb, f.body)
        else:
            self._send(u, s.p, s.n)
            if not whole:  # (not through scratch, which would keep a large body's room)
                self._send(u, PyBytes_AS_STRING(f.body), PyBytes_GET_SIZE(f.body))

    cdef void _upstream_data(self, Upstream u) except *:
        cdef Flight f = u.flight
        if f is None:  # an idle connection spoke: not HTTP we understand
            self._close(u)
            return
        cdef Head* h = &u.head
        cdef int rc
        while True:
            rc = parse_head(u.inb.p, u.inb.n, h, True)
            if rc == HEAD_MORE:
                return
            if rc < 0:
                self._upstream_failed(u, "malformed response")
                return
            if h.status >= 200:
                break
            u.interim += 1  # 1xx: skip it, the real answer follows (a few at most)
            if u.interim > MAX_INTERIM:
                self._upstream_failed(u, f"more than {MAX_INTERIM} interim (1xx) answers")
                return
            buf_consume(&u.inb, h.size)
        if h.content_length > self.max_response_size:
            self._too_large(u)
            return
        if f.no_body or h.status == 204 or h.status == 304:
            body = u.inb.p
            length = 0
        elif h.chunked:
            rc = dechunk(u.inb.p + h.size, u.inb.n - h.size, &u.chunks, self.max_response_size)
            if rc == CHUNKS_MORE:
                return
            if rc == E_CHUNK_TOO_LARGE:
                self._too_large(u)
                return
            if rc < 0:
                self._upstream_failed(u, chunks_refusal(rc))
                return
            body = u.inb.p + h.size
            length = u.chunks.write_at
        elif h.content_length >= 0:
            if u.inb.n < h.size + <size_t>h.content_length:
                return
            body = u.inb.p + h.size
            length = h.content_length
        else:
            return  # delimited by the connection's end: _upstream_eof finishes it
        keep = not h.conn_close if h.minor == 1 else h.conn_keep_alive
        self._answered(u, h, body, length, keep)

    cdef void _upstream_eof(self, Upstream u, bint error) except *:
        cdef Flight f = u.flight
        cdef Head* h = &u.head
        if f is not None and not error and parse_head(u.inb.p, u.inb.n, h, True) == 1 and \
                not h.chunked and h.content_length < 0:
            self._answered(u, h, u.inb.p + h.size, u.inb.n - h.size, False)
            return
        self._upstream_failed(u, "connection closed by the instance")

    cdef void _answered(self, Upstream u, Head* h, const char* body, size_t length,
                        bint keep) except *:
        cdef Flight f = u.flight
        u.flight = None
        f.conn = None
        cdef int status = h.status
        cdef int i
        cdef Buf* o = &self.out
        cdef char line[64]
        cdef Instance inst = u.instance
        inst.answered_at = monotonic()
        if 502 <= status <= 504:
            self._count_failure(inst)
        else:
            inst.failures = 0
            if inst.latency == 0.0:  # the first answer sets it
                inst.latency = inst.answered_at - f.sent_at
            else:
                inst.latency += (inst.answered_at - f.sent_at - inst.latency) * 0.1
        if status >= 500 or status == 450:
            response = self._as_response(h, body, length)
            self._release(u, keep)
            if status != 450:  # a full queue is momentary: retry elsewhere, no penalty
                f.picker.report_failure(f.index)
            self.retried(f.service, str(status))
            f.failed_answer = response
            self._attempt(f)
            return
        if f.client is None:  # the chain's: it finishes the answer
            response = self._as_response(h, body, length)
            self._release(u, keep)
            self._finish(f, response)
            return
        # The answer, as the chain and Response.head would write it, built in one buffer.
        cdef bint keep_client = f.keep_alive and not self.draining
        o.n = 0
        buf_bytes(o, status_line(status))
        buf_add(o, b"Content-Type: ", 14)
        cdef int ct = -1
        for i in range(h.count):
            if span_is(h.names[i], b"content-type", 12):
                ct = i
                break
        if ct >= 0:
            buf_add(o, h.values[ct].p, h.values[ct].n)
        else:
            buf_add(o, b"application/octet-stream", 24)
        buf_add(o, line, snprintf(line, 64, b"\r\nContent-Length: %zu\r\n", length))
        for i in range(h.count):
            if not skip_response_header(h.names[i]):
                buf_add(o, h.names[i].p, h.names[i].n)
                buf_add(o, b": ", 2)
                buf_add(o, h.values[i].p, h.values[i].n)
                buf_add(o, b"\r\n", 2)
        buf_add(o, b"X-Request-Id: ", 14)
        buf_bytes(o, f.request_id)
        buf_add(o, b"\r\n", 2)
        if f.response_headers:
            for name, value in f.response_headers:
                buf_bytes(o, (<str>name).encode("latin-1"))
                buf_add(o, b": ", 2)
                buf_bytes(o, (<str>value).encode("latin-1"))
                buf_add(o, b"\r\n", 2)
        if not keep_client:
            buf_add(o, b"Connection: close\r\n", 19)
        buf_add(o, b"\r\n", 2)
        buf_add(o, body, length)
        self._release(u, keep)
        self.flights.discard(f)
        f.series.observe(status, _perf_counter() - f.started, PyBytes_GET_SIZE(f.body), length)
        c = f.client
        f.client = None
        if c is None or c.closed:
            return
        c.working = None
        if self.access_log is not None:
            self._log(c, status, length)
        self._send(c, o.p, o.n)
        if not keep_client:
            c.closing = True
            if c.outb.n == 0:
                self._linger(c)
            return
        self._serve_next(c)

    cdef Response _as_response(self, Head* h, const char* body, size_t length):
        """An upstream's answer as a Response (kept as the answer if no retry does better)."""
        content_type = "application/octet-stream"
        cdef Buf* s = &self.scratch
        cdef int i
        cdef bytes content = PyBytes_FromStringAndSize(body, length)
        s.n = 0
        for i in range(h.count):
            if span_is(h.names[i], b"content-type", 12):
                content_type = PyBytes_FromStringAndSize(h.values[i].p, h.values[i].n) \
                    .decode("latin-1")
            elif not skip_response_header(h.names[i]):
                buf_add(s, h.names[i].p, h.names[i].n)
                buf_add(s, b": ", 2)
                buf_add(s, h.values[i].p, h.values[i].n)
                buf_add(s, b"\r\n", 2)
        return Response(h.status, content, PyBytes_FromStringAndSize(s.p, s.n), content_type)

    cdef void _release(self, Upstream u, bint keep) except *:
        """To a request waiting for a connection to its instance, else back to the idle
        ones; or closed."""
        if keep and not u.closed and not u.instance.retired:
            buf_consume(&u.inb, u.inb.n)
            if not self._next_waiting(u.instance, u):
                u.instance.idle.append(u)
        else:
            self._close(u)

    cdef bint _next_waiting(self, Instance inst, Upstream u) except -1:
        """Give a freed connection (or, with u None, a freed slot) to the oldest request
        still waiting for one on `inst`."""
        cdef Flight f
        while inst.waiting:
            f = inst.waiting.pop(0)
            if f.client is None and f.future is None or f.future is not None and f.future.done():
                continue  # gone meanwhile
            if u is not None:
                self._send_upstream(f, u)
            else:
                self._connect(f, inst)
            return True
        return False

    cdef void _upstream_failed(self, Upstream u, str why) except *:
        cdef Flight f = u.flight
        cdef bint silent_reuse = u.reused and u.inb.n == 0 and not u.connecting
        u.flight = None
        self._close(u)
        if f is not None and f.conn is u:
            f.conn = None
            if silent_reuse:  # an idle connection the instance closed as we sent: not its fault
                self._connect(f, u.instance)
                return
            self._failed(f, why)

    cdef void _failed(self, Flight f, str why) except *:
        f.picker.report_failure(f.index)
        self.retried(f.service, "connect")
        cdef Instance inst = f.instances[f.index]
        self._count_failure(inst)
        f.failed_transport = error_response(502, f"upstream {inst.where} failed: {why}")
        self._attempt(f)

    cdef void _finish(self, Flight f, Response response) except *:
        self.flights.discard(f)
        if f.future is not None:
            if not f.future.done():
                try:
                    f.future.set_result(f.on_finish(f.exchange, response))
                except Exception as exc:
                    f.future.set_exception(exc)
            return
        c = f.client
        f.client = None
        if c is None:
            return
        self._decorate(response, f.request_id, f.response_headers)
        f.series.observe(response.status, _perf_counter() - f.started, len(f.body),
                         len(response.body))
        c.working = None
        if c.closed:
            return
        self._answer(c, response, f.keep_alive)
        if not c.closed:
            self._serve_next(c)

    cdef void _abandon(self, Flight f) except *:
        """The client left: its upstream exchange cannot be reused mid-stream."""
        self.flights.discard(f)
        f.client = None
        if f.conn is not None:
            u = f.conn
            f.conn = None
            u.flight = None
            self._close(u)

    # --- time ----------------------------------------------------------------------------
    def _sweep(self):
        self.sweeper = self.loop.call_later(0.05, self._sweep)  # first: whatever happens below
        now = self.loop.time()
        for f in [f for f in self.flights if (<Flight>f).deadline <= now]:
            self._guarded(self._time_out, f)
        for f in [f for f in self.flights if (<Flight>f).conn is not None and
                  (<Flight>f).conn.connecting and (<Flight>f).conn.connect_by <= now]:
            self._guarded(self._connect_timed_out, f)
        self._guarded(self._judge_outstanding, None)
        self.sweeps += 1
        if self.sweeps % 20 == 0:  # connection timeouts are seconds long: once a second
            for c in list(self.clients):
                self._guarded(self._expire_now, c)

    def _guarded(self, step, item):
        try:
            step(item)
        except Exception:
            log.exception("data plane: a timeout failed")

    def _judge_outstanding(self, _):
        """Per-try timeouts, and stalled instances (see Instance)."""
        cdef double now = monotonic(), stall
        cdef Flight f
        cdef Instance inst
        cdef dict oldest = {}  # instance -> the flight it has had longest
        for item in list(self.flights):
            f = <Flight>item
            if f.conn is None:
                continue
            if f.try_timeout > 0 and f.tries_left > 0 and now - f.sent_at > f.try_timeout and \
                    f.picker.available() > len(f.tried):
                self._try_timed_out(f)
                continue
            inst = <Instance>f.instances[f.index]
            other = oldest.get(inst)
            if other is None or (<Flight>other).sent_at > f.sent_at:
                oldest[inst] = f
        for item, other in oldest.items():
            inst = <Instance>item
            f = <Flight>other
            stall = max(STALL_FLOOR, STALL_FACTOR * inst.latency)
            if inst.latency > 0.0 and now - f.sent_at > stall and \
                    now - inst.answered_at > stall and now >= inst.ejected_until:
                self._eject(inst, f"stalled: nothing answered for {now - f.sent_at:.1f}s "
                                  f"(usually {inst.latency * 1000:.0f} ms)")

    cdef void _try_timed_out(self, Flight f) except *:
        cdef Instance inst = f.instances[f.index]
        f.picker.report_failure(f.index)
        self._count_failure(inst)
        self.retried(f.service, "timeout")
        u = f.conn
        f.conn = None
        u.flight = None
        self._close(u)
        f.failed_transport = error_response(504, f"upstream {inst.where} did not answer "
                                                 f"within {f.try_timeout:.1f}s")
        self._attempt(f)

    cdef void _count_failure(self, Instance inst) except *:
        inst.failures += 1
        if inst.failures >= CONSECUTIVE_FAILURES:
            self._eject(inst, f"{inst.failures} failures in a row")

    cdef void _eject(self, Instance inst, str why) except *:
        """Ask the route table to take `inst` out for a while (it may keep it: the last
        instance of a version is never ejected)."""
        cdef double now = monotonic()
        if now < inst.ejected_until or self.ejected is None:
            return
        inst.failures = 0
        seconds = self.ejected(inst.ip, inst.port, why)
        inst.ejected_until = now + (seconds if seconds > 0 else 1.0)  # kept: judged again in 1s

    def _connect_timed_out(self, Flight f):
        if f.conn is not None:
            self._upstream_failed(f.conn, "connect timed out")

    def _expire_now(self, Client c):
        self._expire(c, self.loop.time())

    def _time_out(self, Flight f):
        self._timed_out(f)

    cdef void _timed_out(self, Flight f) except *:
        if f.index >= 0:
            f.picker.report_failure(f.index)
            self._count_failure(<Instance>f.instances[f.index])
        where = f"upstream {(<Instance>f.instances[f.index]).where}" if f.index >= 0 \
            else "no upstream"
        if f.conn is not None:
            u = f.conn
            f.conn = None
            u.flight = None
            self._close(u)
        self._finish(f, error_response(504, f"{where} did not answer within "
                                            f"{f.backend.timeout:.1f}s"))

    cdef void _linger(self, Client c) except *:
        """Close a connection after its last answer, gently: what the client is still
        sending (a body the answer refused) would make closing now a reset, which can
        destroy the answer before the client reads it. So: no more writes, and what comes
        is read away until the client closes, or for LINGER seconds."""
        if c.closed or c.linger_until:
            return
        if c.inb.n == 0 and not c.in_message:
            self._close(c)  # nothing unread: the usual case
            return
        shutdown(c.fd, SHUT_WR)
        c.inb.n = 0
        c.linger_until = self.loop.time() + LINGER

    cdef void _expire(self, Client c, double now) except *:
        if c.linger_until:
            if now > c.linger_until:
                self._close(c)
            return
        if c.working is not None or c.closed:
            return
        if c.in_message or c.inb.n:
            if now - c.message_started > self.read_timeout:
                c.inb.n = 0
                c.body_at = 0
                c.in_message = False
                self._answer(c, error_response(408, "request not received in time"), False)
        elif now - c.last_activity > self.idle_timeout:
            self._close(c)

    # --- shutdown ------------------------------------------------------------------------
    async def drain(self, double timeout=30.0, double idle_grace=DRAIN_IDLE_GRACE):
        """Stop accepting; answer every request read or sent meanwhile (with Connection:
        close); close a keep-alive connection once it has been idle `idle_grace` seconds
        since the drain began, with nothing waiting in its socket.

        Closing an idle connection at once loses the request its client may be sending
        at that moment (a reset, for a POST no client retries); the grace answers it."""
        import asyncio
        self.draining = True
        if self.listener is not None:
            epoll_ctl(self.ep, EPOLL_CTL_DEL, self.listener.fileno(), NULL)
            self.listener.close()
            self.listener = None
        cdef double began = self.loop.time(), now
        cdef Client client
        cdef char byte
        deadline = began + timeout
        while True:
            now = self.loop.time()
            for c in list(self.clients):
                client = <Client>c
                if client.working is None and not client.in_message and not client.inb.n \
                        and not client.outb.n and \
                        now - max(client.last_activity, began) >= idle_grace and \
                        recv(client.fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) <= 0:
                    self._close(client)
            if not self.clients or now > deadline:
                break
            await asyncio.sleep(0.02)

    def close(self):
        if self.loop is not None:
            self.loop.remove_reader(self.ep)
        if self.sweeper is not None:
            self.sweeper.cancel()
        for c in list(self.clients):
            self._close(c)
        for inst in self.instances.values():
            for u in (<Instance>inst).idle:
                self._close(u)


async def _awaited(awaitable):
    return await awaitable


cdef class _Limited:
    """A fast request parked while its rate limit asks Redis."""
    cdef DataPlane plane
    cdef Client client
    cdef FastRoute fast
    cdef bytes head, body
    cdef bint keep_alive
    cdef LimitView view

    def __init__(self, DataPlane plane, Client client, FastRoute fast, bytes head, bytes body,
                 bint keep_alive, LimitView view):
        self.plane = plane
        self.client = client
        self.fast = fast
        self.head = head
        self.body = body
        self.keep_alive = keep_alive
        self.view = view

    def __call__(self, task):
        self.plane._limited_done(self.client, self.fast, self.head, self.body, self.keep_alive,
                                 self.view, task)


cdef class _Abandoned:
    """A chain's request whose client left (its Future cancelled): drop the exchange."""
    cdef DataPlane plane
    cdef Flight flight

    def __init__(self, DataPlane plane, Flight flight):
        self.plane = plane
        self.flight = flight

    def __call__(self, future):
        if future.cancelled():
            self.plane._abandon(self.flight)


cdef class _Parked:
    cdef DataPlane plane
    cdef Client client
    cdef object request
    cdef bint keep_alive

    def __init__(self, DataPlane plane, Client client, request, bint keep_alive):
        self.plane = plane
        self.client = client
        self.request = request
        self.keep_alive = keep_alive

    def __call__(self, done):
        self.plane._parked_done(self.client, done, self.request, self.keep_alive)


cdef inline int memcmp_ct(const char* a, const char* b, size_t n) noexcept:
    """Compare in constant time (a token check must not leak where it differs)."""
    cdef unsigned char diff = 0
    cdef size_t i
    for i in range(n):
        diff |= <unsigned char>a[i] ^ <unsigned char>b[i]
    return diff


cdef inline bint skip_request_header(Span name) noexcept:
    """Hop-by-hop request headers, and those the gateway sets itself."""
    return span_is(name, b"connection", 10) or span_is(name, b"keep-alive", 10) or \
        span_is(name, b"proxy-connection", 16) or span_is(name, b"transfer-encoding", 17) or \
        span_is(name, b"te", 2) or span_is(name, b"upgrade", 7) or \
        span_is(name, b"host", 4) or span_is(name, b"content-length", 14) or \
        span_is(name, b"authorization", 13) or span_is(name, b"expect", 6) or \
        span_is(name, b"trailer", 7) or span_is(name, b"x-request-id", 12)


cdef inline bint skip_response_header(Span name) noexcept:
    """Hop-by-hop response headers, and those the gateway writes itself."""
    return span_is(name, b"connection", 10) or span_is(name, b"keep-alive", 10) or \
        span_is(name, b"transfer-encoding", 17) or span_is(name, b"content-length", 14) or \
        span_is(name, b"content-type", 12) or span_is(name, b"x-request-id", 12) or \
        span_is(name, b"date", 4) or span_is(name, b"server", 6)
