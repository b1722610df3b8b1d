/* channel.c: the config channel between the control process and the
 * workers of one node.
 *
 * The control process listens on a unix socket in the abstract namespace,
 * "\0moongate-<master pid>-ctl" (Linux: nothing is left on disk, and the
 * name dies with the socket); each worker connects at start, retrying every
 * CHAN_RETRY_MS while the control process is not up (at node start, or
 * while it is respawned). Both directions carry frames: a 4-byte big-endian
 * length, then that many bytes (JSON, see lua/moongate/config_doc.lua).
 *
 * C moves bytes only. The control process hands each frame from a worker
 * to its handler's peer(id, text) (lua.c); a worker queues the frames and
 * runs its handler's reload("frame"), which pulls them (mg_cfg_next) and
 * answers (mg_cfg_send). The first frame a worker sends on each connection
 * is its hello, {"hello": <worker id>}, then the last answer it gave (the
 * version it has in force), so a respawned control process learns where
 * every worker is.
 *
 * Who may connect: the socket is reachable by any local process of the
 * network namespace, and frames carry the whole config (credentials
 * included), so a peer must run as our user and be a child of our master
 * (SO_PEERCRED, then its /proc/<pid>/stat).
 *
 * Limits: a frame from the control process is at most CHAN_MAX_FRAME
 * bytes (a whole config), one from a worker at most CHAN_MAX_ANSWER (a
 * hello or an answer: a version number and an error text, which
 * worker.lua bounds); an end that is sent more closes the connection (a
 * worker then reconnects). At most CHAN_MAX_PEERS connections. Writes are
 * queued without a bound: the control process writes one frame per
 * version to each worker, and a worker only a few small answers.
 *
 * Out of memory: a frame that cannot be queued (the control's copy for a
 * worker, or a worker's copy of a received one) is not dropped quietly, as
 * the worker would then stay behind until some later delta failed to apply:
 * the connection is closed, and the worker's reconnect brings it the
 * snapshot of the version in force (as after any loss of the channel).
 * Test hook: MOONGATE_TEST_CHAN_OOM="control:N" or "worker:N" makes the
 * Nth frame that end queues fail as if malloc had (chan_fault; without the
 * variable, one compare per frame).
 */
#define _GNU_SOURCE /* struct ucred */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "mg.h"

#define CHAN_MAX_FRAME (256u << 20) /* 256 MiB: a config far beyond 100,000 routes */
#define CHAN_MAX_ANSWER (64u << 10) /* 64 KiB: worker -> control (hello, applied, refused) */
#define CHAN_RETRY_MS 50
#define CHAN_MAX_PEERS 1024
#define CHAN_READ_SIZE 65536

/* Received bytes not yet cut into frames. */
typedef struct {
    char *buf;
    size_t len, cap;
} chan_inbuf_t;

typedef struct chan_peer_s {
    uv_pipe_t pipe; /* must be first: the handle casts to the peer */
    uint32_t id;
    int notify; /* closed while serving: tell Lua (peer(id, nil)) once the handle is closed */
    chan_inbuf_t in;
    struct chan_peer_s *next;
} chan_peer_t;

typedef struct {
    uv_write_t req;
    uv_buf_t buf; /* header and payload in one allocation */
} chan_write_t;

/* A frame a worker received and has not pulled yet. */
typedef struct chan_frame_s {
    struct chan_frame_s *next;
    size_t len;
    char data[];
} chan_frame_t;

static struct {
    /* control process */
    uv_pipe_t server;
    int server_open;
    chan_peer_t *peers;
    uint32_t npeers, next_id;
    /* worker */
    uv_pipe_t pipe;
    int pipe_open;    /* initialized, uv_close not called */
    int pipe_closing; /* uv_close called, its callback not run yet */
    int connected;
    int lost_logged;
    uv_timer_t retry;
    int retry_init;
    chan_inbuf_t in;
    chan_frame_t *head, *tail, *pulled;
    char *answer; /* the last mg_cfg_send, sent again after a reconnect */
    size_t answer_len;
    int closed; /* mg__chan_close ran: no reconnecting */
    /* the test hook (MOONGATE_TEST_CHAN_OOM): 0, or which frame fails */
    unsigned fault_at, fault_count;
} chan;

/* Reads MOONGATE_TEST_CHAN_OOM for this end ("control" or "worker"). */
static void chan_fault_init(const char *end)
{
    const char *v = getenv("MOONGATE_TEST_CHAN_OOM");
    size_t n = strlen(end);
    if (v == NULL || strncmp(v, end, n) != 0 || v[n] != ':') return;
    chan.fault_at = (unsigned)strtoul(v + n + 1, NULL, 10);
}

/* 1: the frame being queued is the one the test hook fails. */
static int chan_fault(void)
{
    return chan.fault_at != 0 && ++chan.fault_count == chan.fault_at;
}

/* "\0moongate-<master pid>-ctl": the control process and the workers are
 * all children of the master. */
static socklen_t chan_addr(struct sockaddr_un *sa)
{
    int n;

    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    n = snprintf(sa->sun_path + 1, sizeof(sa->sun_path) - 1, "moongate-%ld-ctl", (long)getppid());
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

/* --- frames --------------------------------------------------------------- */

static void chan_written(uv_write_t *req, int status)
{
    chan_write_t *wr = (chan_write_t *)req;
    (void)status; /* a failed write shows as a read error on the same pipe */
    free(wr->buf.base);
    free(wr);
}

/* Queues one frame (copied) on s; 0 or a negative libuv error. */
static int chan_write(uv_stream_t *s, const char *data, size_t len)
{
    chan_write_t *wr;
    int rc;

    if (len > CHAN_MAX_FRAME) return UV_E2BIG;
    wr = malloc(sizeof(*wr));
    if (wr == NULL) return UV_ENOMEM;
    wr->buf.base = malloc(len + 4);
    if (wr->buf.base == NULL) {
        free(wr);
        return UV_ENOMEM;
    }
    wr->buf.base[0] = (char)(len >> 24);
    wr->buf.base[1] = (char)(len >> 16);
    wr->buf.base[2] = (char)(len >> 8);
    wr->buf.base[3] = (char)len;
    memcpy(wr->buf.base + 4, data, len);
    wr->buf.len = len + 4;
    rc = uv_write(&wr->req, s, &wr->buf, 1, chan_written);
    if (rc != 0) {
        free(wr->buf.base);
        free(wr);
    }
    return rc;
}

/* Room for one read: what is left after cutting frames is less than one
 * frame of at most max bytes and its header, so the buffer never needs
 * more than that and a read. */
static void chan_alloc(chan_inbuf_t *in, uv_buf_t *buf, size_t max)
{
    if (mg__grow(&in->buf, &in->cap, in->len, CHAN_READ_SIZE, CHAN_READ_SIZE,
                 max + 4 + CHAN_READ_SIZE) != 0) {
        buf->base = NULL;
        buf->len = 0; /* libuv reports UV_ENOBUFS: the pipe is closed */
        return;
    }
    buf->base = in->buf + in->len;
    buf->len = in->cap - in->len;
}

/* Cuts the complete frames out of in, calling fn(ud, data, len) for each.
 * 0; -1 when a frame is longer than max (*flen_out: its length); -2 when
 * fn failed (out of memory), which stops the cutting: the caller closes
 * the connection. The buffer is freed once a big frame (a snapshot) is
 * through, so an idle channel holds 64 KiB at most. */
static int chan_frames(chan_inbuf_t *in, size_t max, int (*fn)(void *, const char *, size_t),
                       void *ud, size_t *flen_out)
{
    size_t pos = 0;
    int rc = 0;

    while (in->len - pos >= 4) {
        const unsigned char *p = (const unsigned char *)in->buf + pos;
        size_t flen = (size_t)p[0] << 24 | (size_t)p[1] << 16 | (size_t)p[2] << 8 | p[3];
        if (flen > max) {
            *flen_out = flen;
            return -1;
        }
        if (in->len - pos - 4 < flen) break;
        if (fn(ud, in->buf + pos + 4, flen) != 0) {
            rc = -2;
            break;
        }
        pos += 4 + flen;
    }
    if (rc != 0) return rc; /* the connection is closed: its buffer goes with it */
    if (pos > 0) {
        memmove(in->buf, in->buf + pos, in->len - pos);
        in->len -= pos;
    }
    if (in->len == 0 && in->cap > 4 * CHAN_READ_SIZE) {
        free(in->buf);
        in->buf = NULL;
        in->cap = 0;
    }
    return 0;
}

static void chan_inbuf_free(chan_inbuf_t *in)
{
    free(in->buf);
    memset(in, 0, sizeof(*in));
}

/* --- control process: the workers' connections ------------------------------ */

static void peer_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    chan_alloc(&((chan_peer_t *)h)->in, buf, CHAN_MAX_ANSWER);
}

/* Lua hears of a closed peer here, from the loop, never from inside
 * mg_ctl_send (an FFI call must not re-enter Lua). */
static void peer_closed(uv_handle_t *h)
{
    chan_peer_t *p = (chan_peer_t *)h;
    if (p->notify && !mg__worker->stopping) mg__lua_peer(mg__worker, p->id, NULL, 0);
    chan_inbuf_free(&p->in);
    free(p);
}

static void peer_close(chan_peer_t *p)
{
    chan_peer_t **pp;

    for (pp = &chan.peers; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == p) {
            *pp = p->next;
            chan.npeers--;
            break;
        }
    }
    p->notify = 1;
    uv_close((uv_handle_t *)&p->pipe, peer_closed);
}

static int peer_frame(void *ud, const char *data, size_t len)
{
    chan_peer_t *p = ud;
    mg__lua_peer(mg__worker, p->id, data, len);
    return 0;
}

static void peer_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    chan_peer_t *p = (chan_peer_t *)s;
    (void)buf;

    if (n == 0) return;
    if (n < 0) {
        if (n != UV_EOF) mg_log(MG_LOG_WARN, "channel: peer %u: %s", p->id, uv_strerror((int)n));
        peer_close(p);
        return;
    }
    p->in.len += (size_t)n;
    size_t flen = 0;
    if (chan_frames(&p->in, CHAN_MAX_ANSWER, peer_frame, p, &flen) < 0) {
        mg_log(MG_LOG_WARN,
               "channel: peer %u sent a frame of %zu bytes (a worker's are at most %u); "
               "disconnected",
               p->id, flen, CHAN_MAX_ANSWER);
        peer_close(p);
    }
}

/* The parent pid in /proc/<pid>/stat ("S ppid ..." after the comm), or -1. */
static long chan_ppid_of(pid_t pid)
{
    char buf[512];
    const char *p = mg__proc_stat(pid, buf, sizeof(buf));
    return p != NULL && p[1] == ' ' ? strtol(p + 2, NULL, 10) : -1;
}

static int chan_peer_allowed(int fd)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return 0;
    return cred.uid == geteuid() && chan_ppid_of(cred.pid) == (long)getppid();
}

static void server_conn(uv_stream_t *server, int status)
{
    chan_peer_t *p;
    uv_os_fd_t fd;

    if (status < 0) {
        mg_log(MG_LOG_ERROR, "channel: accept: %s", uv_strerror(status));
        return;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL) return;
    uv_pipe_init(server->loop, &p->pipe, 0);
    if (uv_accept(server, (uv_stream_t *)&p->pipe) != 0) {
        uv_close((uv_handle_t *)&p->pipe, peer_closed);
        return;
    }
    if (uv_fileno((uv_handle_t *)&p->pipe, &fd) != 0 || !chan_peer_allowed(fd) ||
        chan.npeers >= CHAN_MAX_PEERS) {
        mg_log(MG_LOG_WARN, "channel: refused a connection that is not one of our workers");
        uv_close((uv_handle_t *)&p->pipe, peer_closed);
        return;
    }
    p->id = ++chan.next_id;
    p->next = chan.peers;
    chan.peers = p;
    chan.npeers++;
    uv_read_start((uv_stream_t *)&p->pipe, peer_alloc, peer_read);
}

int mg__chan_listen(mg_worker_t *w)
{
    struct sockaddr_un sa;
    socklen_t salen = chan_addr(&sa);
    int fd, rc;

    chan_fault_init("control");
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        mg_log(MG_LOG_ERROR, "channel: socket: %s", strerror(errno));
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&sa, salen) < 0 || listen(fd, CHAN_MAX_PEERS) < 0) {
        mg_log(MG_LOG_ERROR, "channel: listen on @%s: %s", sa.sun_path + 1, strerror(errno));
        close(fd);
        return -1;
    }
    uv_pipe_init(w->loop, &chan.server, 0);
    chan.server_open = 1;
    rc = uv_pipe_open(&chan.server, fd);
    if (rc != 0) close(fd);
    if (rc == 0) rc = uv_listen((uv_stream_t *)&chan.server, CHAN_MAX_PEERS, server_conn);
    if (rc != 0) {
        mg_log(MG_LOG_ERROR, "channel: %s", uv_strerror(rc));
        return -1;
    }
    return 0;
}

int mg_ctl_send(uint32_t peer, const char *data, size_t len)
{
    chan_peer_t *p;

    /* O(peers): a node has a few workers, at most 256. */
    for (p = chan.peers; p != NULL; p = p->next) {
        int rc;
        if (p->id != peer) continue;
        rc = chan_fault() ? UV_ENOMEM : chan_write((uv_stream_t *)&p->pipe, data, len);
        if (rc == 0) return MG_OK;
        if (rc == UV_ENOMEM) {
            /* dropping the frame would leave that worker silently behind:
             * its reconnect brings it the version in force */
            mg_log(MG_LOG_ERROR,
                   "channel: out of memory for a %zu-byte frame to peer %u; disconnected, so "
                   "that it reconnects and gets the version in force",
                   len, p->id);
            peer_close(p);
        }
        return MG_ERROR;
    }
    return MG_DECLINED;
}

/* --- worker: the connection to the control process ---------------------------- */

static void client_retry(uv_timer_t *t);

static void client_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    (void)hint;
    chan_alloc(&chan.in, buf, CHAN_MAX_FRAME);
}

static int client_frame(void *ud, const char *data, size_t len)
{
    chan_frame_t *f = chan_fault() ? NULL : malloc(sizeof(*f) + len);
    (void)ud;
    if (f == NULL) {
        /* not dropped: the caller reconnects, and the snapshot follows */
        mg_log(MG_LOG_ERROR, "channel: out of memory for a %zu-byte frame", len);
        return -1;
    }
    f->next = NULL;
    f->len = len;
    memcpy(f->data, data, len);
    if (chan.tail)
        chan.tail->next = f;
    else
        chan.head = f;
    chan.tail = f;
    return 0;
}

static void client_closed(uv_handle_t *h)
{
    (void)h;
    chan.pipe_closing = 0;
    chan_inbuf_free(&chan.in); /* a frame cut short: the next control sends a snapshot */
    if (!chan.closed) uv_timer_start(&chan.retry, client_retry, CHAN_RETRY_MS, 0);
}

/* Logged once per loss, not once per retry. */
static void client_lost(const char *why)
{
    if (!chan.closed && !chan.lost_logged) {
        mg_log(MG_LOG_WARN,
               "lost the control process (%s); serving the version in force, reconnecting", why);
        chan.lost_logged = 1;
    }
    chan.connected = 0;
    if (!chan.pipe_open) return;
    chan.pipe_open = 0;
    chan.pipe_closing = 1;
    uv_close((uv_handle_t *)&chan.pipe, client_closed);
}

static void client_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    int rc;
    (void)s;
    (void)buf;
    if (n == 0) return;
    if (n < 0) {
        client_lost(n == UV_EOF ? "connection closed" : uv_strerror((int)n));
        return;
    }
    chan.in.len += (size_t)n;
    size_t flen = 0;
    rc = chan_frames(&chan.in, CHAN_MAX_FRAME, client_frame, NULL, &flen);
    if (rc == -1) client_lost("a frame too long");
    if (rc == -2) client_lost("out of memory for a frame; a snapshot follows the reconnect");
    /* the frames cut before a failure are applied; the snapshot comes after them */
    if (chan.head != NULL) mg__lua_reload(mg__worker, "frame");
}

/* One connection attempt: connecting a unix socket never blocks (it is
 * refused at once when nobody listens). */
static void client_connect(mg_worker_t *w)
{
    struct sockaddr_un sa;
    socklen_t salen = chan_addr(&sa);
    char hello[64];
    int fd, rc, n;

    if (chan.closed || chan.pipe_open || chan.pipe_closing) return;
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        uv_timer_start(&chan.retry, client_retry, CHAN_RETRY_MS, 0);
        return;
    }
    do {
        rc = connect(fd, (struct sockaddr *)&sa, salen);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        close(fd);
        uv_timer_start(&chan.retry, client_retry, CHAN_RETRY_MS, 0);
        return;
    }
    uv_pipe_init(w->loop, &chan.pipe, 0);
    rc = uv_pipe_open(&chan.pipe, fd);
    if (rc != 0) {
        close(fd);
        chan.pipe_closing = 1; /* its callback retries */
        uv_close((uv_handle_t *)&chan.pipe, client_closed);
        return;
    }
    chan.pipe_open = 1;
    rc = uv_read_start((uv_stream_t *)&chan.pipe, client_alloc, client_read);
    n = snprintf(hello, sizeof(hello), "{\"hello\":%d}", w->id);
    if (rc == 0) rc = chan_write((uv_stream_t *)&chan.pipe, hello, (size_t)n);
    if (rc == 0 && chan.answer != NULL)
        rc = chan_write((uv_stream_t *)&chan.pipe, chan.answer, chan.answer_len);
    if (rc != 0) {
        client_lost(uv_strerror(rc));
        return;
    }
    chan.connected = 1;
    if (chan.lost_logged) mg_log(MG_LOG_INFO, "reconnected to the control process");
    chan.lost_logged = 0;
}

static void client_retry(uv_timer_t *t)
{
    client_connect(t->data);
}

int mg__chan_connect(mg_worker_t *w)
{
    chan_fault_init("worker");
    uv_timer_init(w->loop, &chan.retry);
    chan.retry.data = w;
    chan.retry_init = 1;
    client_connect(w);
    return 0;
}

int mg_cfg_next(const char **data, size_t *len)
{
    free(chan.pulled); /* the frame the previous call handed out */
    chan.pulled = chan.head;
    if (chan.pulled == NULL) return MG_DECLINED;
    chan.head = chan.pulled->next;
    if (chan.head == NULL) chan.tail = NULL;
    *data = chan.pulled->data;
    *len = chan.pulled->len;
    return MG_OK;
}

int mg_cfg_send(const char *data, size_t len)
{
    char *copy;

    /* the control process would disconnect us, and this answer is sent
     * again on each reconnect: refused here instead */
    if (len > CHAN_MAX_ANSWER) return MG_EINVAL;
    copy = malloc(len ? len : 1);
    if (copy == NULL) return MG_ERROR;
    memcpy(copy, data, len);
    free(chan.answer);
    chan.answer = copy;
    chan.answer_len = len;
    if (!chan.connected) return MG_DECLINED;
    if (chan_write((uv_stream_t *)&chan.pipe, data, len) == 0) return MG_OK;
    /* not written: the reconnect sends the answer (kept above) again */
    client_lost("out of memory for an answer");
    return MG_ERROR;
}

/* --- stopping --------------------------------------------------------------- */

void mg__chan_close(mg_worker_t *w)
{
    (void)w;
    if (chan.closed) return;
    chan.closed = 1;
    if (chan.server_open) uv_close((uv_handle_t *)&chan.server, NULL);
    chan.server_open = 0;
    while (chan.peers != NULL) {
        chan_peer_t *p = chan.peers;
        chan.peers = p->next;
        uv_close((uv_handle_t *)&p->pipe, peer_closed);
    }
    chan.npeers = 0;
    if (chan.retry_init) uv_close((uv_handle_t *)&chan.retry, NULL);
    chan.retry_init = 0;
    if (chan.pipe_open) uv_close((uv_handle_t *)&chan.pipe, NULL);
    chan.pipe_open = 0;
    chan.connected = 0;
}
