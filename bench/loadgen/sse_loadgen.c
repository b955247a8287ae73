/*
 * sse_loadgen: SSE subscriber swarm + pipelined HTTP publisher in one
 * single-threaded epoll loop.
 *
 * It opens C connections to GET /events?topic=..., parses every stream
 * incrementally (plain close-delimited or chunked bodies, CR/LF/CRLF line
 * ends, frames split anywhere), and publishes at a fixed rate R through one
 * or a few keep-alive connections sending pipelined POST /publish?topic=T.
 * Each message body carries its CLOCK_MONOTONIC publish time in ns, so every
 * delivery yields a latency sample (same machine, same clock).
 *
 * Output is JSON lines on stdout: one "connect" record once every connection
 * is ready, then one "step" record per measured rate step. With --control the
 * steps come from stdin ("step RATE WARMUP_S DURATION_S DRAIN_S", "quit"), so
 * a driver can measure the server between steps; otherwise --rates lists them.
 *
 * With --ports P1,P2,.. the subscribers and publishers go round-robin over
 * several servers (the nodes of a cluster), and --server-pid takes all their
 * pids, whose CPU and write syscalls are summed.
 *
 * Every loop is bounded: --max-runtime caps the whole process.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_LEN 256
#define HEAD_MAX 8192
#define READ_BUF (256 * 1024)
#define MAX_EVENTS 1024
#define MAX_STEPS 64
#define MAX_PUBS 16
#define MAX_PORTS 64
#define MAX_LAG_S 0.05

/* ---------------------------------------------------------------- utils */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    *sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    return *user + *sys;
}

static void die(const char *msg) {
    fprintf(stderr, "sse_loadgen: %s: %s\n", msg, strerror(errno));
    exit(2);
}

/* The server's CPU seconds (utime + stime) and write syscalls, read from /proc
 * at the window's edges so the figures cover exactly the measured window. */
static double server_cpu_s(int pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    unsigned long long ut = 0, st = 0;
    /* after ")": state(3) ... utime is field 14, stime 15 */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static long long server_syscw(int pid) {
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/%d/io", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long long v = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "syscw: %lld", &v) == 1) break;
    fclose(f);
    return v;
}

/* The same, summed over several server processes (the nodes of a cluster):
 * -1 if any of them cannot be read. */
static int o_server_pids[MAX_PORTS];
static int o_nserver_pids = 0;

static double servers_cpu_s(void) {
    double sum = 0;
    for (int k = 0; k < o_nserver_pids; k++) {
        double c = server_cpu_s(o_server_pids[k]);
        if (c < 0) return -1;
        sum += c;
    }
    return sum;
}

static long long servers_syscw(void) {
    long long sum = 0;
    for (int k = 0; k < o_nserver_pids; k++) {
        long long w = server_syscw(o_server_pids[k]);
        if (w < 0) return -1;
        sum += w;
    }
    return sum;
}

/* ------------------------------------------------------------ histogram */

/* Log-linear buckets in microseconds: exact below 64 us, then 32 sub-buckets
 * per power of two (about 3% relative precision) up to 2^40 us. */
#define H_SUB 32
#define H_NB (64 + 35 * H_SUB)

typedef struct {
    uint64_t counts[H_NB];
    uint64_t total;
    uint64_t max_us;
    double sum_us;
} hist_t;

static int h_index(uint64_t v) {
    if (v < 64) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 5;
    int idx = 64 + (msb - 6) * H_SUB + (int)((v >> shift) - H_SUB);
    return idx < H_NB ? idx : H_NB - 1;
}

static uint64_t h_low(int idx) {
    if (idx < 64) return (uint64_t)idx;
    int k = idx - 64;
    int msb = k / H_SUB + 6;
    int shift = msb - 5;
    return ((uint64_t)(H_SUB + k % H_SUB)) << shift;
}

static uint64_t h_high(int idx) { return idx + 1 < H_NB ? h_low(idx + 1) : h_low(idx) * 2; }

static void h_add(hist_t *h, uint64_t v) {
    h->counts[h_index(v)]++;
    h->total++;
    h->sum_us += (double)v;
    if (v > h->max_us) h->max_us = v;
}

/* Upper edge of the bucket holding the q-quantile (conservative), capped by max. */
static uint64_t h_quantile(const hist_t *h, double q) {
    if (h->total == 0) return 0;
    uint64_t rank = (uint64_t)(q * (double)h->total);
    if (rank < 1) rank = 1;
    uint64_t seen = 0;
    for (int i = 0; i < H_NB; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            uint64_t v = h_high(i) - 1;
            return v < h->max_us ? v : h->max_us;
        }
    }
    return h->max_us;
}

static void h_print(FILE *f, const char *name, const hist_t *h) {
    fprintf(f,
            "\"%s\":{\"count\":%llu,\"mean\":%.1f,\"p50\":%llu,\"p90\":%llu,\"p99\":%llu,"
            "\"p999\":%llu,\"max\":%llu}",
            name, (unsigned long long)h->total, h->total ? h->sum_us / (double)h->total : 0.0,
            (unsigned long long)h_quantile(h, 0.50), (unsigned long long)h_quantile(h, 0.90),
            (unsigned long long)h_quantile(h, 0.99), (unsigned long long)h_quantile(h, 0.999),
            (unsigned long long)h->max_us);
}

/* ------------------------------------------------------ chunked decoding */

enum { CK_SIZE, CK_EXT, CK_DATA, CK_DATA_END, CK_TRAILER_START, CK_TRAILER_LINE, CK_DONE };

typedef struct {
    uint8_t st;
    uint64_t left;
} chunk_t;

typedef void (*sink_fn)(void *arg, const char *p, size_t n);

/* Decodes a chunked body; hands data to sink. Returns bytes consumed; sets
 * *done once the last chunk and trailer are read (the rest is not consumed). */
static size_t chunk_feed(chunk_t *c, const char *p, size_t n, sink_fn sink, void *arg, int *done) {
    size_t i = 0;
    *done = 0;
    while (i < n) {
        char ch = p[i];
        switch (c->st) {
        case CK_SIZE:
        case CK_EXT:
            if (ch == '\n') {
                c->st = c->left ? CK_DATA : CK_TRAILER_START;
            } else if (c->st == CK_SIZE && isxdigit((unsigned char)ch)) {
                int v = ch <= '9' ? ch - '0' : (ch | 0x20) - 'a' + 10;
                c->left = c->left * 16 + (uint64_t)v;
            } else {
                c->st = CK_EXT;
            }
            i++;
            break;
        case CK_DATA: {
            size_t m = n - i;
            if (m > c->left) m = (size_t)c->left;
            if (sink) sink(arg, p + i, m);
            c->left -= m;
            i += m;
            if (!c->left) c->st = CK_DATA_END;
            break;
        }
        case CK_DATA_END:
            if (ch == '\n') c->st = CK_SIZE;
            i++;
            break;
        case CK_TRAILER_START:
            i++;
            if (ch == '\r') break;
            if (ch == '\n') {
                c->st = CK_DONE;
                *done = 1;
                return i;
            }
            c->st = CK_TRAILER_LINE;
            break;
        case CK_TRAILER_LINE:
            if (ch == '\n') c->st = CK_TRAILER_START;
            i++;
            break;
        default:
            *done = 1;
            return i;
        }
    }
    return i;
}

/* ------------------------------------------------------------ state */

enum { S_IDLE, S_CONNECTING, S_HEAD, S_BODY, S_CLOSED };
enum { PH_CONNECT, PH_IDLE, PH_WARMUP, PH_MEASURE, PH_DRAIN };

typedef struct {
    int fd;
    uint8_t st;
    uint8_t chunked;
    uint8_t ready;
    uint8_t cr_pending;
    uint8_t ev_system;
    uint8_t ev_data;
    uint8_t has_ts;
    uint16_t line_len;
    uint32_t head_len;
    chunk_t ck;
    uint64_t ts;
    uint64_t t_start;
    uint64_t events;
    uint64_t events_mark;
    char *head;
    char line[LINE_MAX_LEN];
} conn_t;

typedef struct {
    int fd;
    int connected;
    char *out;
    size_t out_len, out_off, out_cap;
    uint64_t inflight;
    /* response parsing */
    int in_body;
    int chunked;
    uint64_t body_left;
    int status;
    int line_no;
    size_t hl;
    char hline[512];
    chunk_t ck;
} pub_t;

/* options */
static const char *o_host = "127.0.0.1";
static int o_port = 8000;
static int o_conns = 1000;
static int o_topics = 1000;
static int o_per_conn = 10;
static const char *o_prefix = "Topic";
static int o_conc = 100;
static double o_connect_timeout = 120.0;
static int o_control = 0;
static double o_rates[MAX_STEPS];
static int o_nrates = 0;
static double o_warmup = 1.0, o_duration = 5.0, o_drain = 3.0;
static int o_pubs = 1;
static int o_pipeline = 1000;
static double o_max_runtime = 3600.0;
/* Several servers (--ports P1,P2,..): subscriber i connects to the
 * (i mod n)th, publisher k to the (k mod n)th. */
static int o_ports[MAX_PORTS];
static int o_nports = 0;
/* Subscriber sockets bind to this many loopback source addresses (127.0.0.2..)
 * in turn. With one, connect() searches the ephemeral port range for a free
 * port against every connection already open to the same address, which
 * grows with the count (about 30% of this process's CPU at 19,000): it made
 * the connect time look superlinear in the server. 0 = no bind. */
/* Publish through a NATS server at this port (same --host) instead of POST
 * /publish: "PUB <topic> <len>" frames, fire and forget (no replies, so no
 * pipeline window; backpressure is the socket), PINGs answered. The server
 * under test must relay that NATS (gochan --driver nats). 0 = HTTP. */
static int o_nats_port = 0;
static int o_source_addrs = -1; /* -1: 16 when --host is loopback, else 0 */

/* global state */
static int ep;
static conn_t *conns;
static pub_t pubs[MAX_PUBS];
static uint32_t *subs; /* ready subscribers per topic */
static char **topic_names;
static size_t *topic_name_len;
static char rbuf[READ_BUF];
static struct sockaddr_in addr;
static struct sockaddr_in addrs[MAX_PORTS]; /* addr with each of o_ports */
static struct sockaddr_in nats_addr;
static volatile sig_atomic_t stop_flag = 0;
static uint64_t t0;

static int next_conn = 0, in_handshake = 0, n_ready = 0, n_failed = 0, n_live = 0;
static uint64_t connect_done_ns = 0;
static hist_t h_connect;

static int phase = PH_CONNECT;
static double cur_rate;
static uint64_t pub_start, win_start, win_end, phase_end, drain_deadline;
static double cur_warmup, cur_duration, cur_drain;
static uint64_t pub_sent;   /* messages built since pub_start */
static uint64_t topic_rr;   /* round-robin cursor */
static uint64_t pub_win, expected_win, rx_win, rx_outside, rx_total, sys_events, heartbeats;
static uint64_t pub_skipped;
static uint64_t pub_responses, pub_errors, pub_non2xx, disconnects, conn_errors, bytes_in, reads;
static uint64_t win_disconnects;
static hist_t h_lat;
static double cpu_mark, cpu_user_mark, cpu_sys_mark, cpu_win, cpu_user_win, cpu_sys_win;
static uint64_t bytes_mark, reads_mark, bytes_win, reads_win;
static uint64_t now_cached;
static double srv_cpu_mark, srv_cpu_win;
static uint64_t loop_max_ns; /* longest pass of the event loop in the window */
static uint64_t loop_passes, loop_busy_ns, loop_events;
static long long srv_syscw_mark, srv_syscw_win;

static void on_sigint(int s) {
    (void)s;
    stop_flag = 1;
}

/* ------------------------------------------------------------ SSE parse */

static void sse_line(conn_t *c, const char *l, size_t n) {
    if (n == 0) {
        if (c->ev_data) {
            if (c->ev_system) {
                sys_events++;
            } else {
                c->events++;
                rx_total++;
                if (c->has_ts && c->ts >= win_start && c->ts <= win_end && win_end) {
                    rx_win++;
                    uint64_t lat = now_cached > c->ts ? (now_cached - c->ts) / 1000 : 0;
                    h_add(&h_lat, lat);
                } else {
                    rx_outside++;
                }
            }
            if (!c->ready) {
                c->ready = 1;
                n_ready++;
                in_handshake--;
                h_add(&h_connect, (now_cached - c->t_start) / 1000);
                for (int k = 0; k < o_per_conn; k++)
                    subs[((uint64_t)(c - conns) * (uint64_t)o_per_conn + (uint64_t)k) % (uint64_t)o_topics]++;
            }
        }
        c->ev_system = 1; /* default SSE event type is "message" */
        c->ev_data = 0;
        c->has_ts = 0;
        return;
    }
    if (l[0] == ':') {
        heartbeats++;
        return;
    }
    if (n >= 5 && memcmp(l, "data:", 5) == 0) {
        c->ev_data = 1;
        /* body: {"payload":"TopicN <t>"}: t follows the last space */
        size_t i = n;
        while (i > 5 && l[i - 1] != ' ') i--;
        uint64_t v = 0;
        int digits = 0;
        for (size_t j = i; j < n && l[j] >= '0' && l[j] <= '9'; j++, digits++)
            v = v * 10 + (uint64_t)(l[j] - '0');
        if (digits >= 6) {
            c->ts = v;
            c->has_ts = 1;
        }
        return;
    }
    if (n >= 6 && memcmp(l, "event:", 6) == 0) {
        const char *v = l + 6;
        size_t vn = n - 6;
        if (vn && *v == ' ') v++, vn--;
        c->ev_system = (vn == 7 && memcmp(v, "message", 7) == 0);
        return;
    }
}

static void sse_feed(void *arg, const char *p, size_t n) {
    conn_t *c = (conn_t *)arg;
    size_t i = 0;
    while (i < n) {
        if (c->cr_pending) {
            c->cr_pending = 0;
            if (p[i] == '\n') {
                i++;
                continue;
            }
        }
        size_t j = i;
        while (j < n && p[j] != '\n' && p[j] != '\r') j++;
        if (j == n) {
            size_t m = n - i;
            if (c->line_len + m > LINE_MAX_LEN) m = LINE_MAX_LEN - c->line_len;
            memcpy(c->line + c->line_len, p + i, m);
            c->line_len = (uint16_t)(c->line_len + m);
            return;
        }
        if (c->line_len) {
            size_t m = j - i;
            if (c->line_len + m > LINE_MAX_LEN) m = LINE_MAX_LEN - c->line_len;
            memcpy(c->line + c->line_len, p + i, m);
            sse_line(c, c->line, c->line_len + m);
            c->line_len = 0;
        } else {
            sse_line(c, p + i, j - i);
        }
        if (p[j] == '\r') c->cr_pending = 1;
        i = j + 1;
    }
}

/* ------------------------------------------------------------ conns */

static void conn_close(conn_t *c, int count_error) {
    if (c->st == S_CLOSED) return;
    if (c->fd >= 0) {
        struct linger lg = {1, 0}; /* RST: no TIME_WAIT pile-up across runs */
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        n_live--;
    }
    c->fd = -1;
    free(c->head);
    c->head = NULL;
    if (c->ready) {
        disconnects++;
        if (phase == PH_MEASURE || phase == PH_DRAIN) win_disconnects++;
    } else {
        in_handshake--;
        n_failed++;
        if (count_error) conn_errors++;
    }
    c->st = S_CLOSED;
}

static int set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL, 0);
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void conn_start(int i) {
    conn_t *c = &conns[i];
    c->t_start = now_ns();
    in_handshake++;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->fd = -1;
        c->st = S_IDLE;
        conn_close(c, 1);
        return;
    }
    c->fd = fd;
    n_live++;
    c->st = S_CONNECTING;
    c->ev_system = 1;
    if (o_source_addrs > 0) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(i % o_source_addrs));
        int one = 1;
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            conn_close(c, 1);
            return;
        }
    }
    struct sockaddr_in *to = &addrs[i % o_nports];
    if (connect(fd, (struct sockaddr *)to, sizeof *to) < 0 && errno != EINPROGRESS) {
        conn_close(c, 1);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)i};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
}

static void conn_send_request(int i) {
    conn_t *c = &conns[i];
    int err = 0;
    socklen_t el = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) {
        conn_close(c, 1);
        return;
    }
    char req[8192];
    int n = snprintf(req, sizeof req, "GET /events?");
    for (int k = 0; k < o_per_conn; k++) {
        uint64_t t = ((uint64_t)i * (uint64_t)o_per_conn + (uint64_t)k) % (uint64_t)o_topics;
        n += snprintf(req + n, sizeof req - (size_t)n, "%stopic=%s", k ? "&" : "", topic_names[t]);
        if (n >= (int)sizeof req - 256) break;
    }
    n += snprintf(req + n, sizeof req - (size_t)n,
                  " HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n"
                  "Cache-Control: no-cache\r\nUser-Agent: sse_loadgen\r\n\r\n",
                  o_host, o_ports[i % o_nports]);
    ssize_t w = write(c->fd, req, (size_t)n);
    if (w != n) {
        conn_close(c, 1);
        return;
    }
    c->st = S_HEAD;
    c->head = malloc(HEAD_MAX);
    if (!c->head) die("malloc");
    c->head_len = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = (uint64_t)i};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void conn_body(conn_t *c, const char *p, size_t n) {
    if (!c->chunked) {
        sse_feed(c, p, n);
        return;
    }
    int done = 0;
    chunk_feed(&c->ck, p, n, sse_feed, c, &done);
    if (done) conn_close(c, 0);
}

static void conn_readable(int i) {
    conn_t *c = &conns[i];
    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        conn_close(c, !c->ready);
        return;
    }
    reads++;
    bytes_in += (uint64_t)r;
    now_cached = now_ns();
    if (c->st == S_BODY) {
        conn_body(c, rbuf, (size_t)r);
        return;
    }
    /* S_HEAD: gather the response head */
    size_t m = (size_t)r;
    if (c->head_len + m > HEAD_MAX - 1) m = HEAD_MAX - 1 - c->head_len;
    memcpy(c->head + c->head_len, rbuf, m);
    size_t old = c->head_len;
    c->head_len += (uint32_t)m;
    c->head[c->head_len] = 0;
    char *end = strstr(c->head, "\r\n\r\n");
    if (!end) {
        if (c->head_len >= HEAD_MAX - 1) conn_close(c, 1);
        return;
    }
    size_t head_size = (size_t)(end - c->head) + 4;
    int status = 0;
    if (strncmp(c->head, "HTTP/1.", 7) == 0 && c->head_len > 12) status = atoi(c->head + 9);
    if (status != 200) {
        conn_close(c, 1);
        return;
    }
    /* Transfer-Encoding: chunked (header names are case-insensitive) */
    for (char *l = strstr(c->head, "\r\n"); l && l < end; l = strstr(l + 2, "\r\n")) {
        if (strncasecmp(l + 2, "transfer-encoding:", 18) == 0) {
            char *v = l + 20;
            char *eol = strstr(v, "\r\n");
            for (char *q = v; eol && q + 7 <= eol; q++)
                if (strncasecmp(q, "chunked", 7) == 0) c->chunked = 1;
        }
    }
    size_t rest_off = head_size - old; /* offset of body bytes within rbuf */
    free(c->head);
    c->head = NULL;
    c->st = S_BODY;
    if (rest_off < (size_t)r) conn_body(c, rbuf + rest_off, (size_t)r - rest_off);
}

/* ------------------------------------------------------------ publisher */

static void pub_flush(int k);

static void pub_connect(int k) {
    pub_t *p = &pubs[k];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in *to = o_nats_port ? &nats_addr : &addrs[k % o_nports];
    if (connect(fd, (struct sockaddr *)to, sizeof *to) < 0) die("publisher connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    set_nonblock(fd);
    memset(p, 0, sizeof *p);
    p->fd = fd;
    p->connected = 1;
    p->out_cap = (size_t)o_pipeline * 512 + 65536;
    p->out = malloc(p->out_cap);
    if (!p->out) die("malloc");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (1ull << 32) | (uint64_t)k};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    if (o_nats_port) {
        static const char hello[] =
            "CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"sse_loadgen\"}\r\n";
        memcpy(p->out, hello, sizeof hello - 1);
        p->out_len = sizeof hello - 1;
        pub_flush(k);
    }
}

/* Publishers connect per step: an idle keep-alive connection between steps
 * could be closed by the server's keep-alive timeout. */
static void pub_close(int k) {
    pub_t *p = &pubs[k];
    if (p->fd > 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, p->fd, NULL);
        close(p->fd);
    }
    free(p->out);
    memset(p, 0, sizeof *p);
}

static void pub_flush(int k) {
    pub_t *p = &pubs[k];
    if (!p->connected) return;
    while (p->out_off < p->out_len) {
        ssize_t w = write(p->fd, p->out + p->out_off, p->out_len - p->out_off);
        if (w < 0) {
            if (errno == EAGAIN) break;
            if (errno == EINTR) continue;
            fprintf(stderr, "sse_loadgen: publisher write: %s\n", strerror(errno));
            p->connected = 0;
            pub_errors++;
            return;
        }
        p->out_off += (size_t)w;
    }
    if (p->out_off == p->out_len) p->out_off = p->out_len = 0;
    struct epoll_event ev = {.events = EPOLLIN | (p->out_len ? EPOLLOUT : 0u),
                             .data.u64 = (1ull << 32) | (uint64_t)k};
    epoll_ctl(ep, EPOLL_CTL_MOD, p->fd, &ev);
}

static void pub_response_done(pub_t *p) {
    pub_responses++;
    if (p->inflight) p->inflight--;
    if (p->status < 200 || p->status > 299) pub_non2xx++;
    p->in_body = 0;
    p->chunked = 0;
    p->body_left = 0;
    p->status = 0;
    p->line_no = 0;
    p->hl = 0;
}

static void pub_head_line(pub_t *p) {
    char *l = p->hline;
    size_t n = p->hl;
    if (n && l[n - 1] == '\r') n--;
    l[n] = 0;
    if (p->line_no++ == 0) {
        p->status = strncmp(l, "HTTP/1.", 7) == 0 && n > 12 ? atoi(l + 9) : 0;
    } else if (n == 0) {
        if (p->chunked) {
            p->in_body = 2;
            memset(&p->ck, 0, sizeof p->ck);
        } else if (p->body_left) {
            p->in_body = 1;
        } else {
            pub_response_done(p);
        }
    } else if (strncasecmp(l, "content-length:", 15) == 0) {
        p->body_left = strtoull(l + 15, NULL, 10);
    } else if (strncasecmp(l, "transfer-encoding:", 18) == 0 && strcasestr(l, "chunked")) {
        p->chunked = 1;
    }
    p->hl = 0;
}

/* Append rbuf[*i..n) up to and including the next LF to p->hline (LF left
 * out, truncated at its size); 1 once a whole line is there. */
static int pub_gather_line(pub_t *p, size_t *i, size_t n) {
    char *nl = memchr(rbuf + *i, '\n', n - *i);
    size_t end = nl ? (size_t)(nl - rbuf) : n;
    size_t m = end - *i;
    if (p->hl + m > sizeof p->hline - 1) m = sizeof p->hline - 1 - p->hl;
    memcpy(p->hline + p->hl, rbuf + *i, m);
    p->hl += m;
    *i = nl ? end + 1 : end;
    return nl != NULL;
}

/* What a NATS server sends a publisher: INFO once, PING now and then (it
 * closes connections that do not PONG), -ERR on a protocol error. */
static void pub_nats_lines(int k, size_t n) {
    pub_t *p = &pubs[k];
    size_t i = 0;
    while (i < n) {
        if (!pub_gather_line(p, &i, n)) break;
        p->hline[p->hl] = 0;
        if (strncmp(p->hline, "PING", 4) == 0) {
            if (p->out_len + 6 <= p->out_cap) {
                memcpy(p->out + p->out_len, "PONG\r\n", 6);
                p->out_len += 6;
                pub_flush(k);
            }
        } else if (strncmp(p->hline, "-ERR", 4) == 0) {
            fprintf(stderr, "sse_loadgen: nats: %s\n", p->hline);
            pub_errors++;
        }
        p->hl = 0;
    }
}

static void pub_readable(int k) {
    pub_t *p = &pubs[k];
    ssize_t r = read(p->fd, rbuf, sizeof rbuf);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        fprintf(stderr, "sse_loadgen: publisher connection closed by server\n");
        epoll_ctl(ep, EPOLL_CTL_DEL, p->fd, NULL);
        close(p->fd);
        p->fd = -1;
        p->connected = 0;
        pub_errors++;
        return;
    }
    size_t i = 0, n = (size_t)r;
    if (o_nats_port) {
        pub_nats_lines(k, n);
        return;
    }
    while (i < n) {
        if (p->in_body == 1) {
            size_t m = n - i;
            if (m > p->body_left) m = (size_t)p->body_left;
            p->body_left -= m;
            i += m;
            if (!p->body_left) pub_response_done(p);
        } else if (p->in_body == 2) {
            int done = 0;
            i += chunk_feed(&p->ck, rbuf + i, n - i, NULL, NULL, &done);
            if (done) pub_response_done(p);
        } else if (pub_gather_line(p, &i, n)) {
            pub_head_line(p);
        }
    }
}

/* Build due requests (token bucket against the wall clock) and write them. */
static void pub_tick(uint64_t now) {
    if (now <= pub_start) return;
    double due_f = cur_rate * (double)(now - pub_start) / 1e9;
    uint64_t due = (uint64_t)due_f;
    /* Open loop, bounded lag: a publisher held back (pipeline full) does not
     * burst later to catch up; what it could not send in time is skipped and
     * counted, so a step never shows more than its rate. */
    uint64_t max_lag = (uint64_t)(cur_rate * MAX_LAG_S) + 1;
    if (due > pub_sent + max_lag) {
        if (phase == PH_MEASURE) pub_skipped += due - pub_sent - max_lag;
        pub_sent = due - max_lag;
    }
    if (due <= pub_sent) return;
    uint64_t want = due - pub_sent;
    int measuring = phase == PH_MEASURE;
    for (int rounds = 0; want && rounds < o_pubs; rounds++) {
        int any = 0;
        for (int k = 0; k < o_pubs && want; k++) {
            pub_t *p = &pubs[k];
            if (!p->connected) continue;
            /* spread evenly: take a share, bounded by the pipeline window */
            uint64_t share = want / (uint64_t)o_pubs + 1;
            while (share && want && p->inflight < (uint64_t)o_pipeline &&
                   p->out_len + 512 < p->out_cap) {
                uint64_t t = topic_rr++ % (uint64_t)o_topics;
                char body[256];
                int bl = snprintf(body, sizeof body, "{\"payload\":\"%s %llu\"}", topic_names[t],
                                  (unsigned long long)now);
                int hl;
                if (o_nats_port) {
                    hl = snprintf(p->out + p->out_len, p->out_cap - p->out_len,
                                  "PUB %s %d\r\n%s\r\n", topic_names[t], bl, body);
                } else {
                    hl = snprintf(p->out + p->out_len, p->out_cap - p->out_len,
                                  "POST /publish?topic=%s HTTP/1.1\r\nHost: %s:%d\r\n"
                                  "Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s",
                                  topic_names[t], o_host, o_ports[k % o_nports], bl, body);
                    p->inflight++;
                }
                p->out_len += (size_t)hl;
                pub_sent++;
                want--;
                share--;
                any = 1;
                if (measuring) {
                    pub_win++;
                    expected_win += subs[t];
                }
            }
        }
        if (!any) break;
    }
    for (int k = 0; k < o_pubs; k++)
        if (pubs[k].out_len) pub_flush(k);
}

/* ------------------------------------------------------------ reports */

static void print_connect(void) {
    double el = (double)(connect_done_ns - t0) / 1e9;
    printf("{\"type\":\"connect\",\"connections\":%d,\"ready\":%d,\"failed\":%d,\"errors\":%llu,"
           "\"connect_time_s\":%.3f,",
           o_conns, n_ready, n_failed, (unsigned long long)conn_errors, el);
    h_print(stdout, "ready_latency_us", &h_connect);
    printf("}\n");
    fflush(stdout);
}

static void print_step(uint64_t now) {
    double target = cur_rate * cur_duration;
    uint64_t minev = UINT64_MAX, maxev = 0;
    int live = 0;
    for (int i = 0; i < o_conns; i++) {
        conn_t *c = &conns[i];
        if (!c->ready) continue;
        if (c->st != S_CLOSED) live++;
        uint64_t d = c->events - c->events_mark;
        if (d < minev) minev = d;
        if (d > maxev) maxev = d;
    }
    if (minev == UINT64_MAX) minev = 0;
    uint64_t inflight = 0;
    for (int k = 0; k < o_pubs; k++) inflight += pubs[k].inflight;
    printf("{\"type\":\"step\",\"rate\":%.1f,\"warmup_s\":%.3f,\"duration_s\":%.3f,"
           "\"drain_s\":%.3f,\"target\":%.0f,\"published\":%llu,\"publish_rate\":%.1f,"
           "\"pub_skipped\":%llu,\"pub_inflight_end\":%llu,\"pub_non2xx\":%llu,"
           "\"pub_errors\":%llu,"
           "\"expected\":%llu,\"received\":%llu,\"delivery_ratio\":%.5f,"
           "\"deliveries_per_s\":%.1f,\"outside_window\":%llu,\"live\":%d,"
           "\"disconnects\":%llu,\"per_conn_min\":%llu,\"per_conn_max\":%llu,"
           "\"heartbeats\":%llu,\"bytes_in\":%llu,\"reads\":%llu,"
           "\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f,\"cpu_share\":%.4f,"
           "\"server_cpu_s\":%.3f,\"server_syscw\":%lld,\"loop_max_us\":%llu,"
           "\"loop_passes\":%llu,\"loop_busy_s\":%.3f,\"loop_events\":%llu,",
           cur_rate, cur_warmup, cur_duration, (double)(now - win_end) / 1e9, target,
           (unsigned long long)pub_win, (double)pub_win / cur_duration,
           (unsigned long long)pub_skipped, (unsigned long long)inflight, (unsigned long long)pub_non2xx,
           (unsigned long long)pub_errors, (unsigned long long)expected_win,
           (unsigned long long)rx_win,
           expected_win ? (double)rx_win / (double)expected_win : 0.0,
           (double)rx_win / cur_duration, (unsigned long long)rx_outside, live,
           (unsigned long long)win_disconnects, (unsigned long long)minev,
           (unsigned long long)maxev, (unsigned long long)heartbeats,
           (unsigned long long)bytes_win, (unsigned long long)reads_win, cpu_user_win,
           cpu_sys_win, cpu_win / cur_duration, srv_cpu_win, srv_syscw_win,
           (unsigned long long)(loop_max_ns / 1000), (unsigned long long)loop_passes,
           (double)loop_busy_ns / 1e9, (unsigned long long)loop_events);
    h_print(stdout, "latency_us", &h_lat);
    printf("}\n");
    fflush(stdout);
}

static void step_begin(double rate, double warmup, double duration, double drain) {
    uint64_t now = now_ns();
    cur_rate = rate > 0 ? rate : 1;
    cur_warmup = warmup;
    cur_duration = duration > 0.01 ? duration : 0.01;
    cur_drain = drain;
    pub_start = now;
    pub_sent = 0;
    pub_win = expected_win = rx_win = rx_outside = 0;
    pub_non2xx = pub_errors = pub_skipped = 0;
    heartbeats = 0;
    win_disconnects = 0;
    loop_max_ns = loop_passes = loop_busy_ns = loop_events = 0;
    memset(&h_lat, 0, sizeof h_lat);
    win_start = win_end = 0;
    for (int k = 0; k < o_pubs; k++) pub_connect(k);
    phase = PH_WARMUP;
    phase_end = now + (uint64_t)(warmup * 1e9);
}

static void phase_advance(uint64_t now) {
    if (phase == PH_WARMUP && now >= phase_end) {
        phase = PH_MEASURE;
        win_start = now;
        win_end = now + (uint64_t)(cur_duration * 1e9);
        for (int i = 0; i < o_conns; i++) conns[i].events_mark = conns[i].events;
        cpu_mark = cpu_seconds(&cpu_user_mark, &cpu_sys_mark);
        bytes_mark = bytes_in;
        reads_mark = reads;
        if (o_nserver_pids) {
            srv_cpu_mark = servers_cpu_s();
            srv_syscw_mark = servers_syscw();
        }
    }
    if (phase == PH_MEASURE && now > win_end) {
        double u, s;
        cpu_win = cpu_seconds(&u, &s) - cpu_mark;
        cpu_user_win = u - cpu_user_mark;
        cpu_sys_win = s - cpu_sys_mark;
        bytes_win = bytes_in - bytes_mark;
        reads_win = reads - reads_mark;
        srv_cpu_win = -1;
        srv_syscw_win = -1;
        if (o_nserver_pids) {
            double c = servers_cpu_s();
            long long w = servers_syscw();
            if (c >= 0 && srv_cpu_mark >= 0) srv_cpu_win = c - srv_cpu_mark;
            if (w >= 0 && srv_syscw_mark >= 0) srv_syscw_win = w - srv_syscw_mark;
        }
        phase = PH_DRAIN;
        drain_deadline = now + (uint64_t)(cur_drain * 1e9);
    }
    if (phase == PH_DRAIN && (now >= drain_deadline || rx_win >= expected_win)) {
        print_step(now);
        for (int k = 0; k < o_pubs; k++) pub_close(k);
        phase = PH_IDLE;
    }
}

/* ------------------------------------------------------------ control */

static char cbuf[4096];
static size_t clen = 0;
static int steps_queued = 0, step_next = 0, quit_requested = 0;

static void control_line(char *l) {
    double r, w, d, dr;
    if (sscanf(l, "step %lf %lf %lf %lf", &r, &w, &d, &dr) == 4) {
        if (phase != PH_IDLE) {
            printf("{\"type\":\"error\",\"message\":\"step while busy\"}\n");
            fflush(stdout);
            return;
        }
        step_begin(r, w, d, dr);
    } else if (strncmp(l, "quit", 4) == 0) {
        quit_requested = 1;
    } else if (l[0]) {
        printf("{\"type\":\"error\",\"message\":\"unknown command\"}\n");
        fflush(stdout);
    }
}

static void control_readable(void) {
    ssize_t r = read(0, cbuf + clen, sizeof cbuf - 1 - clen);
    if (r <= 0) {
        if (r < 0 && errno == EINTR) return;
        quit_requested = 1; /* driver went away */
        epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
        return;
    }
    clen += (size_t)r;
    cbuf[clen] = 0;
    char *s = cbuf, *nl;
    while ((nl = strchr(s, '\n'))) {
        *nl = 0;
        control_line(s);
        s = nl + 1;
    }
    clen = strlen(s);
    memmove(cbuf, s, clen);
    if (clen >= sizeof cbuf - 1) clen = 0;
}

/* ------------------------------------------------------------ main */

static void usage(void) {
    fprintf(stderr,
            "usage: sse_loadgen [--host H] [--port P] [--connections C] [--topics T]\n"
            "  [--per-conn-topics K] [--topic-prefix S] [--concurrency N]\n"
            "  [--connect-timeout S] [--publishers N] [--pipeline N]\n"
            "  [--control | --rates R1,R2,... [--warmup S] [--duration S] [--drain S]]\n"
            "  [--max-runtime S] [--server-pid PID[,PID..]] [--source-addrs N]\n"
            "  [--nats-port P] [--ports P1,P2,...]\n");
    exit(2);
}

/* "1,2,3" into out (at most max); the count. */
static int int_list(const char *v, int *out, int max) {
    int n = 0;
    char *dup = strdup(v), *save = NULL;
    for (char *t = strtok_r(dup, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save))
        out[n++] = atoi(t);
    free(dup);
    return n;
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (strcmp(a, name) == 0 && v && ++i)
        if (OPT("--host")) o_host = v;
        else if (OPT("--port")) o_port = atoi(v);
        else if (OPT("--connections")) o_conns = atoi(v);
        else if (OPT("--topics")) o_topics = atoi(v);
        else if (OPT("--per-conn-topics")) o_per_conn = atoi(v);
        else if (OPT("--topic-prefix")) o_prefix = v;
        else if (OPT("--concurrency")) o_conc = atoi(v);
        else if (OPT("--connect-timeout")) o_connect_timeout = atof(v);
        else if (OPT("--publishers")) o_pubs = atoi(v);
        else if (OPT("--pipeline")) o_pipeline = atoi(v);
        else if (OPT("--warmup")) o_warmup = atof(v);
        else if (OPT("--duration")) o_duration = atof(v);
        else if (OPT("--drain")) o_drain = atof(v);
        else if (OPT("--max-runtime")) o_max_runtime = atof(v);
        else if (OPT("--server-pid")) o_nserver_pids = int_list(v, o_server_pids, MAX_PORTS);
        else if (OPT("--ports")) o_nports = int_list(v, o_ports, MAX_PORTS);
        else if (OPT("--source-addrs")) o_source_addrs = atoi(v);
        else if (OPT("--nats-port")) o_nats_port = atoi(v);
        else if (OPT("--rates")) {
            char *dup = strdup(v), *save = NULL;
            for (char *t = strtok_r(dup, ",", &save); t && o_nrates < MAX_STEPS;
                 t = strtok_r(NULL, ",", &save))
                o_rates[o_nrates++] = atof(t);
            free(dup);
        } else if (strcmp(a, "--control") == 0) o_control = 1;
        else usage();
#undef OPT
    }
    if (o_conns < 1 || o_topics < 1 || o_per_conn < 1 || o_conc < 1 || o_pubs < 1 ||
        o_pubs > MAX_PUBS || o_pipeline < 1)
        usage();
    if (o_per_conn > o_topics) o_per_conn = o_topics;
    if (o_nports == 0) o_ports[o_nports++] = o_port;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_sigint);
    signal(SIGTERM, on_sigint);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur < (rlim_t)o_conns + 64) {
            fprintf(stderr, "sse_loadgen: fd limit %llu too low for %d connections\n",
                    (unsigned long long)rl.rlim_cur, o_conns);
            return 2;
        }
    }
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)o_port);
    if (inet_pton(AF_INET, o_host, &addr.sin_addr) != 1) {
        fprintf(stderr, "sse_loadgen: --host must be an IPv4 address\n");
        return 2;
    }
    for (int k = 0; k < o_nports; k++) {
        addrs[k] = addr;
        addrs[k].sin_port = htons((uint16_t)o_ports[k]);
    }
    nats_addr = addr;
    nats_addr.sin_port = htons((uint16_t)o_nats_port);
    if (o_source_addrs < 0)
        o_source_addrs = (ntohl(addr.sin_addr.s_addr) >> 24) == 127 ? 16 : 0;
    if (o_source_addrs > 250) o_source_addrs = 250;

    topic_names = calloc((size_t)o_topics, sizeof *topic_names);
    topic_name_len = calloc((size_t)o_topics, sizeof *topic_name_len);
    subs = calloc((size_t)o_topics, sizeof *subs);
    conns = calloc((size_t)o_conns, sizeof *conns);
    if (!topic_names || !topic_name_len || !subs || !conns) die("calloc");
    for (int t = 0; t < o_topics; t++) {
        char tmp[128];
        snprintf(tmp, sizeof tmp, "%s%d", o_prefix, t);
        topic_names[t] = strdup(tmp);
        topic_name_len[t] = strlen(tmp);
    }
    for (int i = 0; i < o_conns; i++) conns[i].fd = -1;

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    if (o_control) {
        set_nonblock(0);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 2ull << 32};
        epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    }

    t0 = now_ns();
    uint64_t connect_deadline = t0 + (uint64_t)(o_connect_timeout * 1e9);
    uint64_t hard_deadline = t0 + (uint64_t)(o_max_runtime * 1e9);
    struct epoll_event evs[MAX_EVENTS];
    int exit_code = 0;

    uint64_t prev_pass = now_ns();
    while (!stop_flag) {
        uint64_t now = now_ns();
        now_cached = now;
        /* Time spent outside epoll_wait in the previous pass: how late the load
         * generator itself can be in reading a ready socket. */
        if (phase == PH_MEASURE) {
            uint64_t pass = now - prev_pass;
            if (pass > loop_max_ns) loop_max_ns = pass;
            loop_busy_ns += pass;
            loop_passes++;
        }
        if (now > hard_deadline) {
            fprintf(stderr, "sse_loadgen: --max-runtime reached\n");
            exit_code = 3;
            break;
        }
        if (phase == PH_CONNECT) {
            while (next_conn < o_conns && in_handshake < o_conc) conn_start(next_conn++);
            if (next_conn >= o_conns && in_handshake <= 0) {
                connect_done_ns = now;
                print_connect();
                phase = PH_IDLE;
            } else if (now > connect_deadline) {
                for (int i = 0; i < o_conns; i++)
                    if (!conns[i].ready && conns[i].st != S_CLOSED && conns[i].st != S_IDLE)
                        conn_close(&conns[i], 1);
                n_failed += o_conns - next_conn;
                next_conn = o_conns;
                connect_done_ns = now;
                print_connect();
                phase = PH_IDLE;
            }
        }
        if (phase == PH_IDLE && !o_control) {
            if (step_next < o_nrates) {
                step_begin(o_rates[step_next++], o_warmup, o_duration, o_drain);
                steps_queued++;
            } else {
                break;
            }
        }
        if (phase == PH_IDLE && quit_requested) break;
        if (phase == PH_WARMUP || phase == PH_MEASURE || phase == PH_DRAIN) {
            now = now_cached = now_ns();
            phase_advance(now);
            if (phase == PH_WARMUP || phase == PH_MEASURE) pub_tick(now);
        }
        int timeout = (phase == PH_WARMUP || phase == PH_MEASURE) ? 1 : 20;
        int n = epoll_wait(ep, evs, MAX_EVENTS, timeout);
        prev_pass = now_ns();
        if (phase == PH_MEASURE && n > 0) loop_events += (uint64_t)n;
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            uint64_t d = evs[e].data.u64;
            uint32_t kind = (uint32_t)(d >> 32), idx = (uint32_t)d;
            if (kind == 0) {
                conn_t *c = &conns[idx];
                if (c->st == S_CONNECTING) {
                    if (evs[e].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) conn_send_request((int)idx);
                } else if (c->st == S_HEAD || c->st == S_BODY) {
                    conn_readable((int)idx);
                }
            } else if (kind == 1) {
                if (evs[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) pub_readable((int)idx);
                if ((evs[e].events & EPOLLOUT) && pubs[idx].connected) pub_flush((int)idx);
            } else {
                control_readable();
            }
        }
    }
    for (int i = 0; i < o_conns; i++)
        if (conns[i].st != S_CLOSED && conns[i].fd >= 0) {
            struct linger lg = {1, 0};
            setsockopt(conns[i].fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(conns[i].fd);
        }
    for (int k = 0; k < o_pubs; k++) pub_close(k);
    double u, s;
    double cpu = cpu_seconds(&u, &s);
    printf("{\"type\":\"exit\",\"events_total\":%llu,\"system_events\":%llu,\"disconnects\":%llu,"
           "\"pub_responses\":%llu,\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f,\"cpu_s\":%.3f,"
           "\"wall_s\":%.3f}\n",
           (unsigned long long)rx_total, (unsigned long long)sys_events,
           (unsigned long long)disconnects, (unsigned long long)pub_responses, u, s, cpu,
           (double)(now_ns() - t0) / 1e9);
    fflush(stdout);
    return exit_code;
}
