/* test_http_client.c: the callback API of http_client.c against a scripted
 * HTTP server running on the same loop (real sockets on 127.0.0.1):
 * buffered and streamed bodies (chunk by chunk, as the etcd watch needs),
 * cancel, keep-alive reuse, close-delimited bodies, 1xx, timeouts, refused
 * connections and malformed responses. */
#define _GNU_SOURCE /* memmem, strcasestr */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "check.h"
#include "http_client.h"
#include "mg.h"

static uv_loop_t loop;
static uv_tcp_t server;
static int port;
static int accepts;       /* connections the server accepted */
static int stream_closed; /* the /stream connection saw the client close */
static int second_sent;   /* /chunked: the second chunk went out */
static char last_request[4096];

/* ---- the server ---------------------------------------------------------------- */

typedef struct sconn_s {
    uv_tcp_t tcp;
    uv_timer_t timer;
    char buf[65536];
    size_t len;
    int streaming; /* /stream: chunks until the client closes */
    int ticks;
    int closing;
} sconn_t;

static void on_sclosed(uv_handle_t *h)
{
    sconn_t *s = h->data;
    if (h == (uv_handle_t *)&s->tcp) free(s);
}

static void sclose(sconn_t *s)
{
    if (s->closing) return;
    s->closing = 1;
    if (s->streaming) stream_closed = 1;
    uv_close((uv_handle_t *)&s->timer, NULL);
    uv_close((uv_handle_t *)&s->tcp, on_sclosed);
}

static void on_swritten(uv_write_t *w, int status)
{
    (void)status;
    free(w->data);
    free(w);
}

static void ssend(sconn_t *s, const char *p, size_t n)
{
    if (s->closing) return;
    uv_write_t *w = malloc(sizeof(*w));
    char *copy = malloc(n);
    memcpy(copy, p, n);
    w->data = copy;
    uv_buf_t b = uv_buf_init(copy, (unsigned)n);
    uv_write(w, (uv_stream_t *)&s->tcp, &b, 1, on_swritten);
}

static void sputs(sconn_t *s, const char *p)
{
    ssend(s, p, strlen(p));
}

static void on_chunked_tick(uv_timer_t *t)
{
    sconn_t *s = t->data;
    second_sent = 1;
    sputs(s, "6\r\nsecond\r\n0\r\n\r\n");
}

static void on_stream_tick(uv_timer_t *t)
{
    sconn_t *s = t->data;
    char chunk[64];
    int n = snprintf(chunk, sizeof(chunk), "{\"tick\":%d}", s->ticks++);
    char framed[96];
    int m = snprintf(framed, sizeof(framed), "%x\r\n%.*s\r\n", n, n, chunk);
    ssend(s, framed, (size_t)m);
}

static void on_close_tick(uv_timer_t *t)
{
    sclose(t->data);
}

/* One request in s->buf (head, and a Content-Length body): answers it. */
static int serve(sconn_t *s)
{
    char *end = memmem(s->buf, s->len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - s->buf) + 4;
    size_t body = 0;
    char *clh = strcasestr(s->buf, "\r\ncontent-length:");
    if (clh && clh < end) body = (size_t)strtoul(clh + 17, NULL, 10);
    if (s->len < head + body) return 0;
    size_t n = head + body < sizeof(last_request) - 1 ? head + body : sizeof(last_request) - 1;
    memcpy(last_request, s->buf, n);
    last_request[n] = 0;
    char path[256] = {0};
    sscanf(s->buf, "%*s %255s", path);
    char *q = strchr(path, '?');
    if (q) *q = 0;
    if (!strcmp(path, "/hello")) {
        sputs(s, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: one\r\nX-A: two\r\n\r\nhello");
    } else if (!strcmp(path, "/echo")) {
        char h[128];
        snprintf(h, sizeof(h), "HTTP/1.1 201 Created\r\nContent-Length: %zu\r\n\r\n", body);
        sputs(s, h);
        ssend(s, s->buf + head, body);
    } else if (!strcmp(path, "/chunked")) {
        second_sent = 0;
        sputs(s, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n");
        uv_timer_start(&s->timer, on_chunked_tick, 100, 0);
    } else if (!strcmp(path, "/stream")) {
        s->streaming = 1;
        sputs(s, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        uv_timer_start(&s->timer, on_stream_tick, 10, 10);
    } else if (!strcmp(path, "/close")) {
        sputs(s, "HTTP/1.1 200 OK\r\n\r\nuntil the end");
        uv_timer_start(&s->timer, on_close_tick, 20, 0);
    } else if (!strcmp(path, "/interim")) {
        sputs(s, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                 "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    } else if (!strcmp(path, "/clte")) {
        sputs(s, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "0\r\n\r\n");
    } else if (!strcmp(path, "/badstatus")) {
        sputs(s, "HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    } else if (!strcmp(path, "/badchunk")) {
        sputs(s, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n");
    } else if (!strcmp(path, "/badheader")) {
        sputs(s, "HTTP/1.1 200 OK\r\nX-Bad : a\r\nContent-Length: 0\r\n\r\n");
    } else if (!strcmp(path, "/cut")) {
        sputs(s, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc");
        uv_timer_start(&s->timer, on_close_tick, 20, 0);
    } else if (!strcmp(path, "/big")) {
        static char big[100000];
        memset(big, 'x', sizeof(big));
        sputs(s, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        char f[32];
        snprintf(f, sizeof(f), "%zx\r\n", sizeof(big));
        sputs(s, f);
        ssend(s, big, sizeof(big));
        sputs(s, "\r\n0\r\n\r\n");
    } else if (!strcmp(path, "/extra")) { /* bytes after the response: not reusable */
        sputs(s, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n");
    } else if (!strcmp(path, "/silent") || !strcmp(path, "/headonly")) {
        if (!strcmp(path, "/headonly")) sputs(s, "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n");
    } else {
        sputs(s, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    }
    memmove(s->buf, s->buf + head + body, s->len - head - body);
    s->len -= head + body;
    return 1;
}

static void on_salloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    (void)hint;
    sconn_t *s = h->data;
    b->base = s->buf + s->len;
    b->len = sizeof(s->buf) - s->len;
}

static void on_sread(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    (void)b;
    sconn_t *s = st->data;
    if (n < 0) {
        sclose(s);
        return;
    }
    s->len += (size_t)n;
    while (serve(s)) {
    }
}

static void on_sconn(uv_stream_t *srv, int status)
{
    if (status < 0) return;
    sconn_t *s = calloc(1, sizeof(*s));
    uv_tcp_init(&loop, &s->tcp);
    uv_timer_init(&loop, &s->timer);
    s->tcp.data = s->timer.data = s;
    if (uv_accept(srv, (uv_stream_t *)&s->tcp) != 0) {
        sclose(s);
        return;
    }
    accepts++;
    uv_read_start((uv_stream_t *)&s->tcp, on_salloc, on_sread);
}

/* ---- the client side ----------------------------------------------------------- */

typedef struct {
    int heads, bodies, dones;
    int status;
    int64_t clen;
    int err;
    char msg[256];
    char hdrs[1024];
    char body[200000];
    size_t blen;
    int first_body_before_second; /* /chunked: "first" arrived before "second" left */
    int cancel_after;             /* cancel in on_body after this many pieces */
    int stop_after_bytes;         /* return ETOOLARGE once more than this came */
    mg_http_call_t *call;
} result_t;

static int t_head(void *ud, int status, const mg_header_t *h, uint32_t nh, int64_t clen)
{
    result_t *r = ud;
    r->heads++;
    r->status = status;
    r->clen = clen;
    size_t n = 0;
    for (uint32_t i = 0; i < nh && n < sizeof(r->hdrs) - 300; i++)
        n += (size_t)snprintf(r->hdrs + n, sizeof(r->hdrs) - n, "%.*s=%.*s;", (int)h[i].name_len,
                              h[i].name, (int)h[i].value_len, h[i].value);
    return 0;
}

static int t_body(void *ud, const char *p, size_t len)
{
    result_t *r = ud;
    if (r->bodies == 0 && !second_sent) r->first_body_before_second = 1;
    r->bodies++;
    if (r->blen + len < sizeof(r->body)) {
        memcpy(r->body + r->blen, p, len);
        r->blen += len;
    }
    if (r->stop_after_bytes && r->blen > (size_t)r->stop_after_bytes) return MG_HTTP_ETOOLARGE;
    if (r->cancel_after && r->bodies == r->cancel_after) mg__http_cancel(r->call);
    return 0;
}

static void t_done(void *ud, int err, const char *msg)
{
    result_t *r = ud;
    r->dones++;
    r->err = err;
    snprintf(r->msg, sizeof(r->msg), "%s", msg);
}

static const mg_http_cbs_t cbs = {t_head, t_body, t_done};
static mg_http_client_t *cl;

static void on_deadline(uv_timer_t *t)
{
    *(int *)t->data = 1;
}

/* Runs the loop until cond() or ms passed. */
static int run_until(int (*cond)(void *), void *arg, uint64_t ms)
{
    uv_timer_t t;
    int expired = 0;
    uv_timer_init(&loop, &t);
    t.data = &expired;
    uv_timer_start(&t, on_deadline, ms, 0);
    while (!cond(arg) && !expired)
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    return cond(arg);
}

static int is_done(void *arg)
{
    return ((result_t *)arg)->dones > 0;
}

static int never(void *arg)
{
    (void)arg;
    return 0;
}

static result_t *call(const char *method, const char *path, const char *body, uint32_t timeout_ms,
                      uint32_t idle_ms, int *rc_out)
{
    static result_t r;
    memset(&r, 0, sizeof(r));
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", port, path);
    mg_http_spec_t s = {0};
    s.method = method;
    s.method_len = method ? strlen(method) : 0;
    s.url = url;
    s.url_len = strlen(url);
    s.body = body;
    s.body_len = body ? strlen(body) : 0;
    s.timeout_ms = timeout_ms;
    s.idle_ms = idle_ms;
    int rc = mg__http_start(cl, &s, &cbs, &r, &r.call);
    if (rc_out) *rc_out = rc;
    return &r;
}

static result_t *call_done(const char *method, const char *path, const char *body,
                           uint32_t timeout_ms)
{
    int rc;
    result_t *r = call(method, path, body, timeout_ms, 0, &rc);
    CHECK(rc == 0);
    CHECK(run_until(is_done, r, 3000));
    CHECK(r->dones == 1);
    return r;
}

/* ---- tests ------------------------------------------------------------------------ */

static void test_get_and_reuse(void)
{
    int before = accepts;
    result_t *r = call_done(NULL, "/hello?x=1", NULL, 2000);
    CHECK(r->err == 0);
    CHECK(r->status == 200);
    CHECK(r->clen == 5);
    CHECK_MEM(r->body, r->blen, "hello");
    CHECK(strstr(r->hdrs, "X-A=one;X-A=two;") != NULL);
    CHECK(strstr(last_request, "GET /hello?x=1 HTTP/1.1\r\n") == last_request);
    CHECK(strstr(last_request, "\r\nHost: 127.0.0.1:") != NULL);
    CHECK(strstr(last_request, "Content-Length") == NULL); /* a GET without body has none */
    mg_http_client_stats_t st;
    mg__http_client_stats(cl, &st);
    CHECK(st.idle == 1);
    /* the next call goes on the pooled connection */
    r = call_done("GET", "/hello", NULL, 2000);
    CHECK(r->err == 0);
    CHECK(accepts == before + 1);
    mg__http_client_stats(cl, &st);
    CHECK(st.reused >= 1);
    CHECK(st.active == 0);
}

static void test_post(void)
{
    result_t *r = call_done("POST", "/echo", "payload", 2000);
    CHECK(r->err == 0);
    CHECK(r->status == 201);
    CHECK_MEM(r->body, r->blen, "payload");
    CHECK(strstr(last_request, "\r\nContent-Length: 7\r\n") != NULL);
    r = call_done("POST", "/echo", NULL, 2000); /* an empty POST says so */
    CHECK(strstr(last_request, "\r\nContent-Length: 0\r\n") != NULL);
    CHECK(r->blen == 0 && r->err == 0);
}

static void test_streaming(void)
{
    /* the first chunk is delivered before the server even sent the second */
    result_t *r = call_done("GET", "/chunked", NULL, 2000);
    CHECK(r->err == 0);
    CHECK(r->first_body_before_second);
    CHECK(r->bodies == 2);
    CHECK(r->clen == -1);
    CHECK_MEM(r->body, r->blen, "firstsecond");

    /* an endless stream (the etcd watch shape): cancel after 3 pieces */
    int rc;
    stream_closed = 0;
    r = call("GET", "/stream", NULL, 0, 0, &rc);
    r->cancel_after = 3;
    CHECK(rc == 0);
    run_until(never, NULL, 200);
    CHECK(r->bodies == 3); /* nothing after the cancel */
    CHECK(r->dones == 0);  /* and no on_done */
    CHECK(stream_closed);  /* the connection was closed */
    CHECK(strstr(r->body, "{\"tick\":0}{\"tick\":1}{\"tick\":2}") == r->body);

    /* cancel from outside a callback, mid-stream */
    r = call("GET", "/stream", NULL, 0, 0, &rc);
    run_until(never, NULL, 60);
    CHECK(r->bodies >= 1);
    mg__http_cancel(r->call);
    int seen = r->bodies;
    run_until(never, NULL, 60);
    CHECK(r->bodies == seen);
    CHECK(r->dones == 0);

    /* a callback that refuses more: on_done gets its code */
    r = call("GET", "/big", NULL, 2000, 0, &rc);
    r->stop_after_bytes = 1000;
    CHECK(run_until(is_done, r, 3000));
    CHECK(r->err == MG_HTTP_ETOOLARGE);
    CHECK(strcmp(r->msg, "response too large") == 0);
}

static void test_framing(void)
{
    int before = accepts;
    result_t *r = call_done("GET", "/close", NULL, 2000);
    CHECK(r->err == 0);
    CHECK_MEM(r->body, r->blen, "until the end");
    r = call_done("GET", "/interim", NULL, 2000);
    CHECK(r->err == 0 && r->status == 200 && r->heads == 1);
    CHECK_MEM(r->body, r->blen, "ok");
    r = call_done("HEAD", "/hello", NULL, 2000);
    CHECK(r->err == 0 && r->status == 200 && r->blen == 0);
    /* bytes after a response: that connection is not reused */
    r = call_done("GET", "/extra", NULL, 2000);
    CHECK(r->err == 0);
    CHECK_MEM(r->body, r->blen, "ok");
    int mid = accepts;
    r = call_done("GET", "/hello", NULL, 2000);
    CHECK(r->err == 0);
    CHECK(accepts == mid + 1);
    CHECK(accepts > before);
}

static void test_bad_responses(void)
{
    const char *paths[] = {"/clte", "/badstatus", "/badchunk", "/badheader"};
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
        result_t *r = call_done("GET", paths[i], NULL, 2000);
        CHECK(r->err == MG_HTTP_EBADRESP);
        CHECK(strncmp(r->msg, "bad response", 12) == 0);
    }
    result_t *r = call_done("GET", "/cut", NULL, 2000);
    CHECK(r->err == MG_HTTP_ECLOSED);
    CHECK_MEM(r->body, r->blen, "abc");
}

static void test_timeouts(void)
{
    uint64_t t0 = uv_now(&loop);
    result_t *r = call_done("GET", "/silent", NULL, 150);
    uint64_t took = uv_now(&loop) - t0;
    CHECK(r->err == MG_HTTP_ETIMEDOUT);
    CHECK(strcmp(r->msg, "timeout") == 0);
    CHECK(took >= 140 && took < 1000);
    /* read-idle: the head came, the body never does */
    int rc;
    r = call("GET", "/headonly", NULL, 0, 100, &rc);
    CHECK(run_until(is_done, r, 2000));
    CHECK(r->err == MG_HTTP_ETIMEDOUT && r->heads == 1);
}

static void test_errors(void)
{
    /* refused: a port nobody listens on (bound, then closed) */
    uv_tcp_t tmp;
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(&loop, &tmp);
    uv_tcp_bind(&tmp, (struct sockaddr *)&a, 0);
    struct sockaddr_storage got;
    int len = sizeof(got);
    uv_tcp_getsockname(&tmp, (struct sockaddr *)&got, &len);
    int dead = ntohs(((struct sockaddr_in *)&got)->sin_port);
    uv_close((uv_handle_t *)&tmp, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    static result_t r;
    memset(&r, 0, sizeof(r));
    char url[64];
    snprintf(url, sizeof(url), "http://localhost:%d/", dead);
    mg_http_spec_t s = {.url = url, .url_len = strlen(url), .timeout_ms = 2000};
    CHECK(mg__http_start(cl, &s, &cbs, &r, &r.call) == 0);
    CHECK(run_until(is_done, &r, 3000));
    CHECK(r.err == MG_HTTP_ECONNREFUSED);
    CHECK(strcmp(r.msg, "connection refused") == 0);

    /* refused at once, no callback: */
    const char *bad[] = {"ftp://x/",    "127.0.0.1/",      "http://",     "http://a b/",
                         "http://h:0/", "http://h:99999/", "http://u@h/", "http://[::1/"};
    mg_http_call_t *c;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        mg_http_spec_t b = {.url = bad[i], .url_len = strlen(bad[i])};
        int rc = mg__http_start(cl, &b, &cbs, &r, &c);
        CHECK(rc == MG_HTTP_EURL || rc == MG_HTTP_ESCHEME);
        CHECK(c == NULL);
    }
    mg_http_spec_t hs = {.url = "ftp://127.0.0.1/", .url_len = 16};
    CHECK(mg__http_start(cl, &hs, &cbs, &r, &c) == MG_HTTP_ESCHEME);
    /* a server name that is neither a DNS name nor an address */
    mg_http_spec_t sn = {
        .url = "https://127.0.0.1/", .url_len = 18, .server_name = "a b", .server_name_len = 3};
    CHECK(mg__http_start(cl, &sn, &cbs, &r, &c) == MG_HTTP_EARG);
    mg_header_t h = {"Content-Length", "1", 14, 1};
    mg_http_spec_t bh = {.url = url, .url_len = strlen(url), .headers = &h, .nheaders = 1};
    CHECK(mg__http_start(cl, &bh, &cbs, &r, &c) == MG_HTTP_EARG);
    mg_header_t h2 = {"X-Ok", "a\r\nb", 4, 4};
    bh.headers = &h2;
    CHECK(mg__http_start(cl, &bh, &cbs, &r, &c) == MG_HTTP_EARG);
    mg_http_spec_t bm = {.url = url, .url_len = strlen(url), .method = "G T", .method_len = 3};
    CHECK(mg__http_start(cl, &bm, &cbs, &r, &c) == MG_HTTP_EARG);
    CHECK(r.dones == 1); /* none of these called back */
}

static void test_many(void)
{
    /* 50 concurrent calls on one client: each completes once, correctly */
    static result_t rs[50];
    memset(rs, 0, sizeof(rs));
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/hello", port);
    mg_http_spec_t s = {.url = url, .url_len = strlen(url), .timeout_ms = 3000};
    for (int i = 0; i < 50; i++)
        CHECK(mg__http_start(cl, &s, &cbs, &rs[i], &rs[i].call) == 0);
    for (int i = 0; i < 50; i++) {
        CHECK(run_until(is_done, &rs[i], 3000));
        CHECK(rs[i].dones == 1 && rs[i].err == 0);
        CHECK_MEM(rs[i].body, rs[i].blen, "hello");
    }
    mg_http_client_stats_t st;
    mg__http_client_stats(cl, &st);
    CHECK(st.idle <= 64); /* the pool keeps max_idle_per_host */
}

int main(void)
{
    uv_loop_init(&loop);
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(&loop, &server);
    CHECK(uv_tcp_bind(&server, (struct sockaddr *)&a, 0) == 0);
    CHECK(uv_listen((uv_stream_t *)&server, 128, on_sconn) == 0);
    struct sockaddr_storage got;
    int len = sizeof(got);
    uv_tcp_getsockname(&server, (struct sockaddr *)&got, &len);
    port = ntohs(((struct sockaddr_in *)&got)->sin_port);
    cl = mg__http_client_new(&loop, NULL);
    CHECK(cl != NULL);

    test_get_and_reuse();
    test_post();
    test_streaming();
    test_framing();
    test_bad_responses();
    test_timeouts();
    test_errors();
    test_many();

    /* a call in flight when the client goes: no callback, nothing leaks */
    int rc;
    result_t *r = call("GET", "/silent", NULL, 0, 0, &rc);
    run_until(never, NULL, 20);
    mg__http_client_free(cl);
    run_until(never, NULL, 20);
    CHECK(r->dones == 0);

    uv_close((uv_handle_t *)&server, NULL);
    return check_report();
}
