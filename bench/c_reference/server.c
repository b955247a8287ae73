/* c-epoll: a minimal SSE pub/sub server in C, the measuring stick of
 * bench/compare.py (issue 15). Not a product: no history, no auth, no
 * heartbeats, no broker, no chunked bodies.
 *
 * It speaks as much of gochan's HTTP API as the load generator uses:
 *   GET  /events?topic=A&topic=B   SSE head + gochan's first frame, then frames
 *   POST /publish?topic=T          raw body (Content-Length) -> 200 {"id":"<epoch>-<seq>"}
 *                                  ({"id":null} when no stream holds T)
 *   GET  /healthz                  200 ok
 * with keep-alive and pipelining. A message is encoded once (gochan's frame:
 * "event: T\nid: ..\n" then one "data: " line per line of the body, split on
 * CRLF, LF and CR) and appended to every subscribed connection's output
 * buffer; once per loop pass each connection with pending output gets one
 * write() of everything it has (its frames coalesced). One thread, one epoll
 * loop, non-blocking sockets; a connection whose unsent output would pass
 * --max-pending bytes is dropped.
 *
 *   cc -O2 -o server server.c && ./server --host 127.0.0.1 --port 3000
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEAD (16 * 1024)
#define MAX_BODY (1024 * 1024)
#define MAX_TOPIC 256
#define MAX_TOPICS_PER_CONN 1024
#define READ_MAX (256 * 1024)

static size_t max_pending = 1024 * 1024;
static int sndbuf = 256 * 1024; /* SO_SNDBUF of a stream, like gochan's default */

typedef struct topic topic_t;

typedef struct conn {
    int fd;
    uint8_t streaming, closed, dirty, want_out, close_after;
    char *in;
    size_t in_len, in_cap;
    char *out;
    size_t out_off, out_len, out_cap;
    topic_t **topics;
    int ntopics;
} conn_t;

struct topic {
    char *name;
    size_t len;
    conn_t **subs;
    int nsubs, cap;
};

static int ep;
static char epoch[9];
static uint64_t seq;
static char date_hdr[64];
static time_t date_at;

static conn_t **dirty; /* connections with output to write this pass */
static size_t ndirty, dirty_cap;
static conn_t **grave; /* closed this pass, freed after it */
static size_t ngrave, grave_cap;

static topic_t **table; /* open addressing, power of two, never shrinks */
static size_t table_cap, ntopics;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) die("realloc");
    return p;
}

static void push(conn_t ***list, size_t *n, size_t *cap, conn_t *c) {
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 1024;
        *list = xrealloc(*list, *cap * sizeof **list);
    }
    (*list)[(*n)++] = c;
}

/* ------------------------------------------------------------ topics */

static uint64_t hash(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static topic_t **slot(const char *name, size_t len) {
    size_t i = hash(name, len) & (table_cap - 1);
    while (table[i] && (table[i]->len != len || memcmp(table[i]->name, name, len)))
        i = (i + 1) & (table_cap - 1);
    return &table[i];
}

static topic_t *topic_find(const char *name, size_t len) { return *slot(name, len); }

static topic_t *topic_get(const char *name, size_t len) {
    topic_t **s = slot(name, len);
    if (*s) return *s;
    if (2 * (ntopics + 1) > table_cap) { /* grow, rehash */
        topic_t **old = table;
        size_t old_cap = table_cap;
        table_cap *= 2;
        table = calloc(table_cap, sizeof *table);
        if (!table) die("calloc");
        for (size_t i = 0; i < old_cap; i++)
            if (old[i]) *slot(old[i]->name, old[i]->len) = old[i];
        free(old);
        s = slot(name, len);
    }
    topic_t *t = calloc(1, sizeof *t);
    if (!t) die("calloc");
    t->name = malloc(len);
    if (!t->name) die("malloc");
    memcpy(t->name, name, len);
    t->len = len;
    *s = t;
    ntopics++;
    return t;
}

/* ------------------------------------------------------------ output */

static void conn_close(conn_t *c);

static void mark_dirty(conn_t *c) {
    if (!c->dirty) {
        c->dirty = 1;
        push(&dirty, &ndirty, &dirty_cap, c);
    }
}

/* Append to c's unsent output; past max_pending the connection is dropped. */
static void out_put(conn_t *c, const char *p, size_t n) {
    if (c->closed) return;
    size_t pending = c->out_len - c->out_off;
    if (pending + n > max_pending) {
        conn_close(c);
        return;
    }
    if (c->out_off && c->out_len + n > c->out_cap) { /* compact first */
        memmove(c->out, c->out + c->out_off, pending);
        c->out_off = 0;
        c->out_len = pending;
    }
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 512;
        while (cap < c->out_len + n) cap *= 2;
        c->out = xrealloc(c->out, cap);
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
    mark_dirty(c);
}

static void set_events(conn_t *c, int want_out) {
    if (c->want_out == want_out) return;
    c->want_out = (uint8_t)want_out;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0u), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* One write() of everything c has; the rest waits for EPOLLOUT. */
static void flush(conn_t *c) {
    c->dirty = 0;
    if (c->closed || c->out_off == c->out_len) return;
    ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR) conn_close(c);
        else set_events(c, 1);
        return;
    }
    c->out_off += (size_t)w;
    if (c->out_off < c->out_len) {
        set_events(c, 1);
        return;
    }
    /* All out: give the buffer back (an idle stream holds none). */
    free(c->out);
    c->out = NULL;
    c->out_off = c->out_len = c->out_cap = 0;
    set_events(c, 0);
    if (c->close_after) conn_close(c);
}

static void conn_close(conn_t *c) {
    if (c->closed) return;
    c->closed = 1;
    close(c->fd); /* also removes it from the epoll set */
    for (int k = 0; k < c->ntopics; k++) {
        topic_t *t = c->topics[k];
        for (int j = 0; j < t->nsubs; j++)
            if (t->subs[j] == c) {
                t->subs[j] = t->subs[--t->nsubs];
                break;
            }
    }
    push(&grave, &ngrave, &grave_cap, c); /* events of this pass may still name it */
}

static void conn_free(conn_t *c) {
    free(c->in);
    free(c->out);
    free(c->topics);
    free(c);
}

/* ------------------------------------------------------------ HTTP */

static void update_date(void) {
    time_t now = time(NULL);
    if (now == date_at) return;
    date_at = now;
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(date_hdr, sizeof date_hdr, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
}

static void respond(conn_t *c, const char *status, const char *type, const char *body,
                    size_t body_len, int close_after) {
    char head[512];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %s\r\nServer: c-epoll\r\n%sContent-Type: %s\r\n"
                     "Content-Length: %zu\r\n%s\r\n",
                     status, date_hdr, type, body_len, close_after ? "Connection: close\r\n" : "");
    out_put(c, head, (size_t)n);
    out_put(c, body, body_len);
    if (close_after) c->close_after = 1;
}

static void respond_text(conn_t *c, const char *status, const char *text, int close_after) {
    respond(c, status, "text/plain; charset=utf-8", text, strlen(text), close_after);
}

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Decode a query value (%XX, '+') into out; its length, or -1 if it is not a
 * valid topic (1..256 bytes, no control characters). */
static int topic_decode(const char *p, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == '+') ch = ' ';
        else if (ch == '%') {
            int hi = i + 2 < n ? hexval(p[i + 1]) : -1, lo = i + 2 < n ? hexval(p[i + 2]) : -1;
            if (hi < 0 || lo < 0) return -1;
            ch = (char)(hi * 16 + lo);
            i += 2;
        }
        if ((uint8_t)ch < 0x20 || ch == 0x7f || o == MAX_TOPIC) return -1;
        out[o++] = ch;
    }
    return o ? (int)o : -1;
}

/* Calls fn for each topic= value of the query string; 0 if one is invalid. */
static int each_topic(const char *q, size_t n, int (*fn)(void *, const char *, size_t), void *arg) {
    char name[MAX_TOPIC];
    size_t i = 0;
    while (i < n) {
        const char *amp = memchr(q + i, '&', n - i);
        size_t end = amp ? (size_t)(amp - q) : n;
        if (end - i > 6 && memcmp(q + i, "topic=", 6) == 0) {
            int len = topic_decode(q + i + 6, end - i - 6, name);
            if (len < 0 || !fn(arg, name, (size_t)len)) return 0;
        }
        i = end + 1;
    }
    return 1;
}

static int add_topic(void *arg, const char *name, size_t len) {
    conn_t *c = arg;
    if (len == 7 && memcmp(name, "message", 7) == 0) return 0; /* reserved */
    topic_t *t = topic_get(name, len);
    for (int k = 0; k < c->ntopics; k++)
        if (c->topics[k] == t) return 1; /* repeated: harmless */
    if (c->ntopics == MAX_TOPICS_PER_CONN) return 0;
    c->topics = xrealloc(c->topics, (size_t)(c->ntopics + 1) * sizeof *c->topics);
    c->topics[c->ntopics++] = t;
    if (t->nsubs == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 4;
        t->subs = xrealloc(t->subs, (size_t)t->cap * sizeof *t->subs);
    }
    t->subs[t->nsubs++] = c;
    return 1;
}

static int one_topic(void *arg, const char *name, size_t len) {
    topic_t **found = arg;
    if (*found) return 0; /* one topic per publish */
    *found = topic_find(name, len);
    if (!*found) *found = (topic_t *)-1; /* valid, but nobody holds it */
    return 1;
}

static uint64_t rng_state;

static uint64_t rng(void) { /* xorshift64*: client ids need not be secret here */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static const char HEAD_SSE[] =
    "HTTP/1.1 200 OK\r\nServer: c-epoll\r\n%sContent-Type: text/event-stream\r\n"
    "Cache-Control: no-cache, no-store, must-revalidate, pre-check=0, post-check=0\r\n"
    "Connection: keep-alive\r\nX-Accel-Buffering: no\r\n\r\n"
    "event: message\ndata: {\"config\":{\"client_id\":\"%s\",\"client_ttl_millis\":60000},"
    "\"subscriptions\":[";

static void start_stream(conn_t *c, const char *query, size_t qlen) {
    if (!each_topic(query, qlen, add_topic, c)) {
        respond_text(c, "400 Bad Request", "invalid topic\n", 1);
        return;
    }
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char id[25];
    for (int k = 0; k < 24; k++) id[k] = b64[rng() >> 58];
    id[24] = 0;
    char head[1024];
    int n = snprintf(head, sizeof head, HEAD_SSE, date_hdr, id);
    out_put(c, head, (size_t)n);
    for (int k = 0; k < c->ntopics; k++) { /* JSON strings: escape '"' and '\' */
        topic_t *t = c->topics[k];
        out_put(c, k ? ",\"" : "\"", k ? 2 : 1);
        for (size_t i = 0; i < t->len; i++) {
            if (t->name[i] == '"' || t->name[i] == '\\') out_put(c, "\\", 1);
            out_put(c, &t->name[i], 1);
        }
        out_put(c, "\"", 1);
    }
    out_put(c, "]}\n\n", 4);
    c->streaming = 1;
    if (sndbuf > 0) setsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    free(c->in); /* a stream reads nothing more */
    c->in = NULL;
    c->in_len = c->in_cap = 0;
}

static char *frame_buf;
static size_t frame_cap;

/* gochan's message frame; CRLF, LF and CR each end a data line. */
static size_t encode_frame(const topic_t *t, const char *id, const char *d, size_t n) {
    size_t need = 7 + t->len + 1 + 4 + strlen(id) + 1 + 7 * (n + 1) + n + 1;
    if (need > frame_cap) {
        frame_cap = need;
        frame_buf = xrealloc(frame_buf, frame_cap);
    }
    char *o = frame_buf;
    o += sprintf(o, "event: ");
    memcpy(o, t->name, t->len);
    o += t->len;
    o += sprintf(o, "\nid: %s\n", id);
    size_t i = 0;
    for (;;) {
        size_t j = i;
        while (j < n && d[j] != '\n' && d[j] != '\r') j++;
        memcpy(o, "data: ", 6);
        memcpy(o + 6, d + i, j - i);
        o += 6 + (j - i);
        *o++ = '\n';
        if (j == n) break;
        if (d[j] == '\r' && j + 1 < n && d[j + 1] == '\n') j++;
        i = j + 1;
    }
    *o++ = '\n';
    return (size_t)(o - frame_buf);
}

static void publish(conn_t *c, const char *query, size_t qlen, const char *body, size_t blen) {
    topic_t *t = NULL;
    if (!each_topic(query, qlen, one_topic, &t) || !t) {
        respond_text(c, "400 Bad Request", "one valid topic= is needed\n", 0);
        return;
    }
    if (t == (topic_t *)-1 || t->nsubs == 0) {
        respond(c, "200 OK", "application/json", "{\"id\":null}", 11, 0);
        return;
    }
    char id[32], answer[64];
    snprintf(id, sizeof id, "%s-%llu", epoch, (unsigned long long)++seq);
    size_t n = encode_frame(t, id, body, blen);
    /* Backwards: a dropped subscriber swaps the last one into its place. */
    for (int j = t->nsubs - 1; j >= 0; j--) out_put(t->subs[j], frame_buf, n);
    int an = snprintf(answer, sizeof answer, "{\"id\":\"%s\"}", id);
    respond(c, "200 OK", "application/json", answer, (size_t)an, 0);
}

/* The value of header name (lowercase, with ':') in head, or NULL. */
static const char *header(const char *head, const char *end, const char *name, size_t *len) {
    size_t nl = strlen(name);
    for (const char *l = memchr(head, '\n', (size_t)(end - head)); l && l + 1 < end;
         l = memchr(l + 1, '\n', (size_t)(end - l - 1))) {
        const char *s = l + 1;
        if ((size_t)(end - s) > nl && strncasecmp(s, name, nl) == 0) {
            s += nl;
            while (s < end && (*s == ' ' || *s == '\t')) s++;
            const char *e = memchr(s, '\r', (size_t)(end - s));
            if (!e) e = end;
            *len = (size_t)(e - s);
            return s;
        }
    }
    return NULL;
}

/* Handle every complete request in in[0..len); returns bytes consumed. */
static size_t handle_requests(conn_t *c, const char *in, size_t len) {
    size_t pos = 0;
    while (!c->closed && !c->streaming && !c->close_after) {
        const char *p = in + pos;
        size_t avail = len - pos;
        const char *end = memmem(p, avail, "\r\n\r\n", 4);
        if (!end) {
            if (avail > MAX_HEAD) respond_text(c, "431 Request Header Fields Too Large", "", 1);
            break;
        }
        size_t head_len = (size_t)(end - p) + 4;
        if (head_len > MAX_HEAD) {
            respond_text(c, "431 Request Header Fields Too Large", "", 1);
            break;
        }
        size_t vlen, body_len = 0;
        const char *v;
        if (header(p, end + 2, "transfer-encoding:", &vlen)) {
            respond_text(c, "501 Not Implemented", "no chunked bodies here\n", 1);
            break;
        }
        if ((v = header(p, end + 2, "content-length:", &vlen))) {
            char *stop;
            body_len = strtoull(v, &stop, 10);
            if (stop == v || body_len > MAX_BODY) {
                respond_text(c, "413 Payload Too Large", "body too large\n", 1);
                break;
            }
        }
        if (avail < head_len + body_len) break; /* wait for the body */
        const char *sp1 = memchr(p, ' ', (size_t)(end - p));
        const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(end - sp1 - 1)) : NULL;
        if (!sp1 || !sp2 || (size_t)(end - sp2) < 9 || memcmp(sp2 + 1, "HTTP/1.", 7)) {
            respond_text(c, "400 Bad Request", "bad request line\n", 1);
            break;
        }
        const char *target = sp1 + 1, *qm = memchr(target, '?', (size_t)(sp2 - target));
        size_t plen = (size_t)((qm ? qm : sp2) - target);
        const char *query = qm ? qm + 1 : sp2;
        size_t qlen = (size_t)(sp2 - query);
        size_t mlen = (size_t)(sp1 - p);
        if (sp2[8] == '0' || ((v = header(p, end + 2, "connection:", &vlen)) && vlen == 5 &&
                              strncasecmp(v, "close", 5) == 0))
            c->close_after = 1; /* after this answer */
        int get = mlen == 3 && !memcmp(p, "GET", 3), post = mlen == 4 && !memcmp(p, "POST", 4);
        if (plen == 7 && !memcmp(target, "/events", 7) && get) {
            c->close_after = 0;
            start_stream(c, query, qlen);
        } else if (plen == 8 && !memcmp(target, "/publish", 8) && post) {
            publish(c, query, qlen, p + head_len, body_len);
        } else if (plen == 8 && !memcmp(target, "/healthz", 8) && get) {
            respond_text(c, "200 OK", "ok\n", c->close_after);
        } else if ((plen == 7 && !memcmp(target, "/events", 7)) ||
                   (plen == 8 && (!memcmp(target, "/publish", 8) || !memcmp(target, "/healthz", 8)))) {
            respond_text(c, "405 Method Not Allowed", "method not allowed\n", c->close_after);
        } else {
            respond_text(c, "404 Not Found", "not found\n", c->close_after);
        }
        pos += head_len + body_len;
    }
    return pos;
}

static void conn_readable(conn_t *c) {
    if (c->streaming) { /* a stream sends nothing we need: read it away, see EOF */
        char sink[4096];
        ssize_t r = read(c->fd, sink, sizeof sink);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) conn_close(c);
        return;
    }
    /* One big read per pass into a shared buffer (a pipelining publisher's
     * requests come many at a time); only an unfinished request is kept. */
    static char rbuf[READ_MAX];
    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
    if (r <= 0) {
        if (r == 0 || (errno != EAGAIN && errno != EINTR)) conn_close(c);
        return;
    }
    const char *data = rbuf;
    size_t len = (size_t)r;
    if (c->in_len) { /* the rest of an unfinished request */
        if (c->in_len + len > c->in_cap) {
            c->in_cap = c->in_len + len;
            c->in = xrealloc(c->in, c->in_cap);
        }
        memcpy(c->in + c->in_len, rbuf, len);
        data = c->in;
        len = c->in_len += len;
    }
    size_t used = handle_requests(c, data, len);
    if (c->closed || c->streaming) return;
    size_t rest = len - used;
    if (rest > c->in_cap) {
        c->in = xrealloc(c->in, rest);
        c->in_cap = rest;
    }
    if (rest) memmove(c->in, data + used, rest);
    c->in_len = rest;
}

static void accept_all(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            static int warned;
            if ((errno == EMFILE || errno == ENFILE) && !warned++)
                fprintf(stderr, "c-epoll: accept: out of descriptors\n");
            return; /* EAGAIN, or try again next pass */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    }
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 3000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--host") && v) host = argv[++i];
        else if (!strcmp(a, "--port") && v) port = atoi(argv[++i]);
        else if (!strcmp(a, "--max-pending") && v) max_pending = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--sndbuf") && v) sndbuf = atoi(argv[++i]);
        else {
            fprintf(stderr,
                    "usage: %s [--host 127.0.0.1] [--port 3000] [--max-pending 1048576]"
                    " [--sndbuf 262144 (0: the kernel's)]\n",
                    argv[0]);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    uint32_t e;
    if (getrandom(&e, sizeof e, 0) != sizeof e || getrandom(&rng_state, sizeof rng_state, 0) !=
                                                      sizeof rng_state)
        die("getrandom");
    rng_state |= 1;
    snprintf(epoch, sizeof epoch, "%08x", e);
    table_cap = 1024;
    table = calloc(table_cap, sizeof *table);
    if (!table) die("calloc");

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "c-epoll: --host must be an IPv4 address\n");
        return 2;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0)
        die("listen");
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) < 0) die("epoll");
    fprintf(stderr, "c-epoll listening on http://%s:%d (epoch %s)\n", host, port, epoch);

    static struct epoll_event evs[1024];
    for (;;) {
        int n = epoll_wait(ep, evs, 1024, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        update_date();
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                accept_all(lfd);
                continue;
            }
            if (c->closed) continue;
            if (evs[i].events & EPOLLOUT) mark_dirty(c);
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) conn_readable(c);
        }
        /* The pass's output: one write per connection, its frames together. */
        for (size_t i = 0; i < ndirty; i++) flush(dirty[i]);
        ndirty = 0;
        for (size_t i = 0; i < ngrave; i++) conn_free(grave[i]);
        ngrave = 0;
    }
}
