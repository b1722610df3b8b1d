/* test_http.c: the request path's pure helpers: gathered writes and chunk
 * framing (out.c), hop-by-hop detection and header edits (req.c), the
 * per-request arena, header name and value checks, and the lazy
 * connection deadlines (deadline.c) on a real libuv loop. */
#include <stdio.h>
#include <stdlib.h>

#include "check.h"
#include "mg.h"

static void flatten(const mg_out_t *o, char *dst, size_t *len)
{
    size_t n = 0;
    for (int i = 0; i < o->n; i++) {
        memcpy(dst + n, o->iov[i].base, o->iov[i].len);
        n += o->iov[i].len;
    }
    *len = n;
}

static void test_out(void)
{
    static mg_out_t o;
    char buf[256];
    size_t n;
    const char *data = "hello world";

    mg__out_reset(&o);
    mg__out_add(&o, data, 5);
    mg__out_add(&o, data + 5, 6); /* adjacent: merged into one entry */
    CHECK(o.n == 1);
    CHECK(o.bytes == 11);
    mg__out_add(&o, "", 0); /* empty adds nothing */
    CHECK(o.n == 1);

    mg__out_reset(&o);
    mg__out_add_chunk(&o, data, 11);
    mg__out_add_chunk(&o, data, 0); /* a zero chunk would end the body: skipped */
    mg__out_add_last_chunk(&o);
    flatten(&o, buf, &n);
    CHECK_MEM(buf, n, "b\r\nhello world\r\n0\r\n\r\n");
    CHECK(mg__out_room(&o) == MG_OUT_IOV - o.n);

    /* many chunks: framing buffers are distinct per chunk */
    mg__out_reset(&o);
    for (int i = 0; i < 10; i++)
        mg__out_add_chunk(&o, data, (size_t)i + 1);
    flatten(&o, buf, &n);
    CHECK_MEM(buf, 10, "1\r\nh\r\n2\r\nh");
    CHECK(o.nframes == 10);
}

static void test_hop_by_hop(void)
{
    const char *yes[] = {"Connection",
                         "keep-alive",
                         "Proxy-Connection",
                         "TE",
                         "Trailer",
                         "Transfer-Encoding",
                         "UPGRADE",
                         "Proxy-Authenticate",
                         "Proxy-Authorization"};
    const char *no[] = {"Host", "Content-Length", "X-Connection", "Trailers", "Te2", "Cookie"};
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++)
        CHECK(mg__hop_by_hop(yes[i], strlen(yes[i])));
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
        CHECK(!mg__hop_by_hop(no[i], strlen(no[i])));

    mg_header_t h[2] = {
        {.name = "Connection",
         .name_len = 10,
         .value = "close, X-Secret ,x-other",
         .value_len = 24},
        {.name = "X-Secret", .name_len = 8, .value = "1", .value_len = 1},
    };
    CHECK(mg__named_in_connection(h, 2, "x-secret", 8));
    CHECK(mg__named_in_connection(h, 2, "X-OTHER", 7));
    CHECK(mg__named_in_connection(h, 2, "close", 5));
    CHECK(!mg__named_in_connection(h, 2, "X-Secre", 7)); /* whole tokens only */
    CHECK(!mg__named_in_connection(h + 1, 1, "x-secret", 8));

    /* the same answers from the tokens gathered once per head */
    mg_conn_tokens_t t;
    mg__conn_tokens(&t, h, 2);
    CHECK(t.n == 3 && !t.overflow);
    CHECK(mg__conn_token_has(&t, h, 2, "x-secret", 8));
    CHECK(mg__conn_token_has(&t, h, 2, "X-OTHER", 7));
    CHECK(mg__conn_token_has(&t, h, 2, "close", 5));
    CHECK(!mg__conn_token_has(&t, h, 2, "X-Secre", 7));
    mg__conn_tokens(&t, h + 1, 1);
    CHECK(t.n == 0 && !mg__conn_token_has(&t, h + 1, 1, "x-secret", 8));
    mg_header_t ka = {.name = "connection", .name_len = 10, .value = "Keep-Alive", .value_len = 10};
    mg__conn_tokens(&t, &ka, 1); /* the usual case: nothing to check per field */
    CHECK(t.n == 0);
    /* more tokens than the table holds: every field is still checked */
    char many[512];
    int n = 0;
    for (int i = 0; i < 20; i++)
        n += snprintf(many + n, sizeof(many) - (size_t)n, "x-h%d, ", i);
    mg_header_t mh = {
        .name = "Connection", .name_len = 10, .value = many, .value_len = (uint32_t)n};
    mg__conn_tokens(&t, &mh, 1);
    CHECK(t.overflow);
    CHECK(mg__conn_token_has(&t, &mh, 1, "X-H19", 5));
    CHECK(!mg__conn_token_has(&t, &mh, 1, "x-h20", 5));
}

static void test_names_values(void)
{
    CHECK(mg__strieq("Content-Length", 14, "content-LENGTH", 14));
    CHECK(!mg__strieq("content-length", 14, "content-lengti", 14));
    CHECK(!mg__strieq("host", 4, "hosts", 5));
    CHECK(!mg__strieq("@", 1, "`", 1)); /* folds letters only */
    CHECK(!mg__strieq("[", 1, "{", 1));
    CHECK(mg__strieq("", 0, "", 0));
    for (int c = 0; c < 256; c++)
        CHECK(mg__lower[c] == ((c >= 'A' && c <= 'Z') ? c + 32 : c));

    /* every control but HTAB, and DEL, at every position of values
     * longer and shorter than the 8-byte step */
    char v[40];
    for (size_t len = 1; len < sizeof(v); len += 3) {
        for (size_t at = 0; at < len; at++) {
            for (int c = 0; c < 256; c++) {
                memset(v, 'a', len);
                v[at] = (char)c;
                int ok = !((c < 0x20 && c != '\t') || c == 0x7f);
                if (mg__value_ok(v, len) != ok) {
                    CHECK(!"mg__value_ok disagrees");
                    return;
                }
            }
        }
    }
    CHECK(mg__value_ok("", 0));
    static const char obs[] = "caf\xc3\xa9 \x80\xff obs-text is allowed";
    CHECK(mg__value_ok(obs, sizeof(obs) - 1));
    CHECK(mg__header_valid("X-Ok", 4, "v\t1", 3));
    CHECK(!mg__header_valid("X(a)", 4, "v", 1));
    CHECK(!mg__header_valid("X-Ok", 4, "a\r\nb", 4));

    char d[24];
    CHECK_MEM(d, mg__u64_dec(d, 0), "0");
    CHECK_MEM(d, mg__u64_dec(d, 1234567890), "1234567890");
    CHECK_MEM(d, mg__u64_dec(d, UINT64_MAX), "18446744073709551615");
}

/* ---- lazy deadlines ---- */

static int fired;
static uint64_t fired_at;
static void on_expired(mg_deadline_t *d)
{
    fired++;
    fired_at = uv_now(d->timer.loop);
}

static void on_move_later(uv_timer_t *t)
{
    mg__deadline_set(t->data, 120); /* moved later: the armed timer must not fire it */
}

static void on_clear(uv_timer_t *t)
{
    mg__deadline_set(t->data, 0);
}

static void test_deadline(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    mg_deadline_t d;
    uv_timer_t helper;
    uv_timer_init(&loop, &helper);
    helper.data = &d;

    /* set, then moved later before it expires: fires once, at the later time */
    mg__deadline_init(&d, &loop, NULL, on_expired);
    fired = 0;
    uint64_t t0 = uv_now(&loop);
    mg__deadline_set(&d, 30);
    uv_timer_start(&helper, on_move_later, 10, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(fired == 1);
    CHECK(fired_at >= t0 + 10 + 120);

    /* cleared before it expires: never fires */
    fired = 0;
    mg__deadline_set(&d, 30);
    uv_timer_start(&helper, on_clear, 10, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(fired == 0);

    /* moved earlier: fires at the earlier time */
    fired = 0;
    t0 = uv_now(&loop);
    mg__deadline_set(&d, 5000);
    mg__deadline_set(&d, 20);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(fired == 1);
    CHECK(fired_at >= t0 + 20 && fired_at < t0 + 2000);

    uv_close((uv_handle_t *)&d.timer, NULL);
    uv_close((uv_handle_t *)&helper, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
}

static void test_arena(void)
{
    static mg_arena_t a;
    char big[10000];
    memset(big, 'x', sizeof(big));
    char *p = mg__arena_dup(&a, "abc", 3);
    CHECK(p && memcmp(p, "abc", 3) == 0);
    void *q = mg__arena_alloc(&a, 24);
    CHECK(((uintptr_t)q & 7) == 0);                /* edits are structs: 8-aligned */
    char *r = mg__arena_dup(&a, big, sizeof(big)); /* larger than the first block */
    CHECK(r && r[0] == 'x' && r[sizeof(big) - 1] == 'x');
    CHECK(a.extra != NULL);
    CHECK(memcmp(p, "abc", 3) == 0); /* earlier allocations stay put */
    while (a.extra) {
        mg_arena_block_t *n = a.extra->next;
        free(a.extra);
        a.extra = n;
    }
}

/* Edits a policy makes are what later phases and the backend see:
 * set replaces every value, add appends, remove drops. */
static void test_header_edits(void)
{
    mg_req_t *r = calloc(1, sizeof(*r));
    const char *v;
    size_t vl;
    r->hdrs[0] = (mg_header_t){.name = "Accept", .name_len = 6, .value = "a", .value_len = 1};
    r->hdrs[1] = (mg_header_t){.name = "X-Tag", .name_len = 5, .value = "t1", .value_len = 2};
    r->hdrs[2] = (mg_header_t){.name = "x-tag", .name_len = 5, .value = "t2", .value_len = 2};
    r->v.nheaders = 3;
    CHECK(mg_req_header(r, "x-TAG", 5, 1, &v, &vl) == MG_OK);
    CHECK_MEM(v, vl, "t2");
    CHECK(mg_req_header(r, "x-tag", 5, 2, &v, &vl) == MG_DECLINED);
    CHECK(mg_req_set_header(r, "X-Tag", 5, "new", 3, MG_HDR_SET) == MG_OK);
    CHECK(mg_req_header(r, "x-tag", 5, 0, &v, &vl) == MG_OK);
    CHECK_MEM(v, vl, "new");
    CHECK(mg_req_header(r, "x-tag", 5, 1, &v, &vl) == MG_DECLINED);
    CHECK(mg_req_set_header(r, "x-tag", 5, "more", 4, MG_HDR_ADD) == MG_OK);
    CHECK(mg_req_header(r, "x-tag", 5, 1, &v, &vl) == MG_OK);
    CHECK_MEM(v, vl, "more");
    CHECK(mg_req_set_header(r, "accept", 6, NULL, 0, MG_HDR_REMOVE) == MG_OK);
    CHECK(mg_req_header(r, "Accept", 6, 0, &v, &vl) == MG_DECLINED);
    CHECK(mg_req_set_header(r, "Accept", 6, "b", 1, MG_HDR_ADD) == MG_OK);
    CHECK(mg_req_header(r, "Accept", 6, 0, &v, &vl) == MG_OK);
    CHECK_MEM(v, vl, "b");
    /* a policy cannot split the head it is added to */
    CHECK(mg_req_set_header(r, "X-A", 3, "a\r\nEvil: 1", 11, MG_HDR_SET) == MG_EINVAL);
    CHECK(mg_req_set_header(r, "X A", 3, "a", 1, MG_HDR_SET) == MG_EINVAL);
    CHECK(mg_req_set_header(r, "X-A", 3, "a", 1, 7) == MG_EINVAL);
    CHECK(mg_req_set_uri(r, "no-slash", 8, NULL, 0) == MG_EINVAL);
    CHECK(mg_req_set_uri(r, "/a b", 4, NULL, 0) == MG_EINVAL);
    CHECK(mg_req_set_uri(r, "/ok", 3, "q=1", 3) == MG_OK);
    CHECK_MEM(r->up_path, r->up_path_len, "/ok");
    while (r->arena.extra) {
        mg_arena_block_t *n = r->arena.extra->next;
        free(r->arena.extra);
        r->arena.extra = n;
    }
    free(r);
}

static void test_misc(void)
{
    CHECK(mg__strieq("Content-Length", 14, "content-length", 14));
    CHECK(!mg__strieq("Content-Length", 14, "content-lengt", 13));
    CHECK(strcmp(mg__status_reason(431), "Request Header Fields Too Large") == 0);
    CHECK(strcmp(mg__status_reason(599), "Unknown") == 0);
}

int main(void)
{
    test_out();
    test_hop_by_hop();
    test_names_values();
    test_deadline();
    test_arena();
    test_header_edits();
    test_misc();
    return check_report();
}
