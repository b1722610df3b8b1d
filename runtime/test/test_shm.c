/* test_shm.c: shared-memory zones and the primitives on them: each rate
 * limit algorithm at explicit times (boundaries included), eviction when a
 * set is full, all-or-nothing takes, concurrency slots, breaker
 * transitions, a lock holder SIGKILLed, and several processes taking from
 * one key at once. Times are explicit microseconds, so nothing here depends
 * on the machine's speed except the multi-process test's duration. */
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "mg.h"
#include "shm.h"

#define SEC 1000000LL
#define T0 (1000 * SEC) /* an arbitrary start: windows of 1 s align on it */

static int near(double a, double b)
{
    return fabs(a - b) < 1e-6;
}

static mg_limit_spec_t tb(double rate, double burst)
{
    mg_limit_spec_t s = {MG_LIMIT_TOKEN_BUCKET, burst, rate, 0};
    return s;
}

static mg_limit_spec_t win(int algorithm, double limit, int64_t window_us)
{
    mg_limit_spec_t s = {algorithm, limit, 0, window_us};
    return s;
}

static int take(mg_shm_zone_t *z, const char *key, const mg_limit_spec_t *s, double n, int64_t now,
                mg_limit_result_t *out)
{
    int r = mg_limit_take(z, key, strlen(key), s, n, now, out);
    return r == MG_OK && out->allowed;
}

static void test_zones(void)
{
    mg_shm_zone_t *lim = mg_shm_zone("limits", 6), *brk = mg_shm_zone("breakers", 8);
    uint64_t used, cap, ev;

    CHECK(lim != NULL);
    CHECK(brk != NULL);
    CHECK(mg_shm_zone("nope", 4) == NULL);
    CHECK(mg_shm_zone("limitsx", 6) == lim); /* the length counts, not the NUL */
    /* a NUL inside the name, or a name longer than any zone's, is no zone
     * (before: "limits\0x" matched limits, and the length was read past) */
    CHECK(mg_shm_zone("limits\0x", 8) == NULL);
    {
        static char longname[1 << 16];
        memcpy(longname, "limits", 7);
        CHECK(mg_shm_zone(longname, sizeof(longname)) == NULL);
    }
    CHECK(mg_shm_zone("", 0) == NULL);
    CHECK(mg_shm_stats(lim, &used, &cap, &ev) == MG_OK);
    /* 16 MiB of 128-byte entries in sets of 8 behind 64-byte headers */
    CHECK(cap == ((16u << 20) - 256) / (64 + 8 * 128) * 8);
    CHECK(mg_shm_stats(brk, &used, &cap, &ev) == MG_OK);
    CHECK(cap == ((1u << 20) - 256) / (64 + 8 * 256) * 8);
    CHECK(mg_shm_stats(NULL, &used, &cap, &ev) == MG_EINVAL);
    CHECK(mg__shm_zone_new("tiny", 1024) == NULL); /* smaller than one set */
}

static void test_token_bucket(mg_shm_zone_t *z)
{
    mg_limit_spec_t s = tb(10, 5); /* 10/s, bucket of 5 */
    mg_limit_result_t o;
    int i;

    for (i = 0; i < 5; i++)
        CHECK(take(z, "tb", &s, 1, T0, &o));
    CHECK(o.remaining == 0);
    CHECK(near(o.reset, 0.5)); /* 5 tokens at 10/s */
    CHECK(!take(z, "tb", &s, 1, T0, &o));
    CHECK(near(o.retry_after, 0.1));
    CHECK(o.remaining == 0);
    /* 99 ms later: 0.99 token, still refused, and the refusal took nothing */
    CHECK(!take(z, "tb", &s, 1, T0 + 99000, &o));
    CHECK(near(o.retry_after, 0.001));
    CHECK(take(z, "tb", &s, 1, T0 + 100000, &o)); /* exactly one token */
    CHECK(o.remaining == 0);
    /* refill is continuous and capped at the burst */
    CHECK(take(z, "tb", &s, 0, T0 + 10 * SEC, &o)); /* n = 0 peeks */
    CHECK(o.remaining == 5);
    CHECK(near(o.reset, 0));
    /* n > 1, and n > burst is never admitted */
    CHECK(take(z, "tb", &s, 3, T0 + 10 * SEC, &o));
    CHECK(o.remaining == 2);
    CHECK(!take(z, "tb", &s, 3, T0 + 10 * SEC, &o));
    CHECK(near(o.retry_after, 0.1));
    CHECK(o.remaining == 2);
    CHECK(!take(z, "tb", &s, 6, T0 + 20 * SEC, &o));
    CHECK(o.retry_after == -1);
    CHECK(o.remaining == 5);
    /* a clock behind the stored one (another worker) never refills backwards */
    CHECK(take(z, "tb", &s, 5, T0 + 20 * SEC, &o));
    CHECK(!take(z, "tb", &s, 1, T0 + 19 * SEC, &o));
    /* bad input */
    s.rate = 0;
    CHECK(mg_limit_take(z, "x", 1, &s, 1, T0, &o) == MG_EINVAL);
    s = tb(1, 1);
    CHECK(mg_limit_take(z, "x", 1, &s, -1, T0, &o) == MG_EINVAL);
    CHECK(mg_limit_take(z, "x", 1, &s, NAN, T0, &o) == MG_EINVAL);
    CHECK(mg_limit_take(NULL, "x", 1, &s, 1, T0, &o) == MG_EINVAL);
    s.algorithm = 9;
    CHECK(mg_limit_take(z, "x", 1, &s, 1, T0, &o) == MG_EINVAL);
}

static void test_fixed_window(mg_shm_zone_t *z)
{
    mg_limit_spec_t s = win(MG_LIMIT_FIXED_WINDOW, 3, SEC);
    mg_limit_result_t o;

    CHECK(take(z, "fw", &s, 2, T0 + 250000, &o));
    CHECK(o.remaining == 1);
    CHECK(near(o.reset, 0.75));
    CHECK(!take(z, "fw", &s, 2, T0 + 500000, &o)); /* refused whole: 1 left */
    CHECK(near(o.retry_after, 0.5));
    CHECK(o.remaining == 1);
    CHECK(take(z, "fw", &s, 1, T0 + 999999, &o)); /* last microsecond of the window */
    CHECK(o.remaining == 0);
    CHECK(!take(z, "fw", &s, 1, T0 + 999999, &o));
    CHECK(near(o.retry_after, 0.000001));
    CHECK(take(z, "fw", &s, 3, T0 + SEC, &o)); /* a new window starts from 0 */
    CHECK(o.remaining == 0);
    CHECK(near(o.reset, 1));
    CHECK(!take(z, "fw", &s, 4, T0 + 5 * SEC, &o));
    CHECK(o.retry_after == -1);
    s.window_us = 0;
    CHECK(mg_limit_take(z, "fw", 2, &s, 1, T0, &o) == MG_EINVAL);
}

static void test_sliding_window(mg_shm_zone_t *z)
{
    mg_limit_spec_t s = win(MG_LIMIT_SLIDING_WINDOW, 10, SEC);
    mg_limit_result_t o;

    CHECK(take(z, "sw", &s, 8, T0 + 500000, &o));
    CHECK(o.remaining == 2);
    /* next window, 25% in: count = 8 * 0.75 + 0 = 6 */
    CHECK(take(z, "sw", &s, 0, T0 + SEC + 250000, &o));
    CHECK(o.remaining == 4);
    CHECK(near(o.reset, 0.75));
    CHECK(take(z, "sw", &s, 4, T0 + SEC + 250000, &o)); /* 6 + 4 = 10 */
    CHECK(o.remaining == 0);
    /* refused: prev weight must drop until 8 * (1 - e) + 4 + 1 <= 10, e = 0.375 */
    CHECK(!take(z, "sw", &s, 1, T0 + SEC + 250000, &o));
    CHECK(near(o.retry_after, 0.125));
    CHECK(!take(z, "sw", &s, 1, T0 + SEC + 374999, &o));
    CHECK(take(z, "sw", &s, 1, T0 + SEC + 375000, &o));
    /* cur alone above the limit: wait into the next window, where cur = 5
     * becomes prev: 5 * (1 - t) + 6 <= 10 at t = 0.2 */
    CHECK(!take(z, "sw", &s, 6, T0 + SEC + 500000, &o));
    CHECK(near(o.retry_after, 0.5 + 0.2));
    CHECK(take(z, "sw", &s, 6, T0 + 2 * SEC + 200000, &o));
    /* two windows later nothing is left of it */
    CHECK(take(z, "sw", &s, 10, T0 + 4 * SEC, &o));
    CHECK(o.remaining == 0);
    CHECK(!take(z, "sw", &s, 11, T0 + 9 * SEC, &o));
    CHECK(o.retry_after == -1);
}

static void test_keys(mg_shm_zone_t *z)
{
    mg_limit_spec_t s = win(MG_LIMIT_FIXED_WINDOW, 1, SEC), t = tb(1, 1);
    mg_limit_result_t o;
    char a[200], b[200];

    /* keys over 64 bytes that share their first 64 bytes stay distinct */
    memset(a, 'k', sizeof(a));
    memcpy(b, a, sizeof(b));
    b[199] = 'z';
    CHECK(mg_limit_take(z, a, sizeof(a), &s, 1, T0, &o) == MG_OK && o.allowed);
    CHECK(mg_limit_take(z, b, sizeof(b), &s, 1, T0, &o) == MG_OK && o.allowed);
    CHECK(mg_limit_take(z, a, sizeof(a), &s, 1, T0, &o) == MG_OK && !o.allowed);
    CHECK(mg_limit_take(z, a, 64, &s, 1, T0, &o) == MG_OK && o.allowed); /* a prefix */
    /* one key under two algorithms: two states */
    CHECK(take(z, "same", &s, 1, T0, &o));
    CHECK(take(z, "same", &t, 1, T0, &o));
    CHECK(mg_limit_take(z, "", 0, &s, 1, T0, &o) == MG_OK && o.allowed); /* empty key */
}

/* A zone of one set (8 entries): what happens when it is full. */
static void test_eviction(void)
{
    mg_shm_zone_t *z = mg__shm_zone_new("one-set", 4096);
    mg_limit_spec_t s = win(MG_LIMIT_FIXED_WINDOW, 5, 60 * SEC);
    mg_limit_result_t o;
    uint64_t used, cap, ev;
    char key[16];
    int i;

    CHECK(z != NULL);
    if (z == NULL) return;
    CHECK(mg_shm_stats(z, &used, &cap, &ev) == 0 && cap == 8 && used == 0);
    for (i = 0; i < 8; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        CHECK(take(z, key, &s, i < 4 ? 5 : 1, T0 + i, &o));
    }
    CHECK(mg_shm_stats(z, &used, &cap, &ev) == 0 && used == 8 && ev == 0);
    /* k0..k3 are used up; touch k0 so that k1 is the least recently used */
    CHECK(!take(z, "k0", &s, 1, T0 + 100, &o));
    CHECK(take(z, "new", &s, 1, T0 + 200, &o));
    CHECK(mg_shm_stats(z, &used, &cap, &ev) == 0 && used == 8 && ev == 1);
    /* the live keys kept their state; k1 starts again */
    CHECK(!take(z, "k0", &s, 1, T0 + 300, &o));
    CHECK(!take(z, "k2", &s, 1, T0 + 300, &o));
    CHECK(!take(z, "k3", &s, 1, T0 + 300, &o));
    CHECK(take(z, "k4", &s, 4, T0 + 300, &o) && o.remaining == 0);
    CHECK(take(z, "k1", &s, 5, T0 + 400, &o)); /* evicted: a fresh window; evicts another */
    CHECK(mg_shm_stats(z, &used, &cap, &ev) == 0 && ev == 2);
    /* after the window every entry has expired: reused, not counted */
    for (i = 0; i < 8; i++) {
        snprintf(key, sizeof(key), "x%d", i);
        CHECK(take(z, key, &s, 1, T0 + 61 * SEC, &o));
    }
    CHECK(mg_shm_stats(z, &used, &cap, &ev) == 0 && ev == 2 && used == 8);

    /* held concurrency slots are never evicted; a set of them is full */
    mg_req_t *r = calloc(2, sizeof(mg_req_t));
    int64_t cur = 0;
    for (i = 0; i < 8; i++) {
        mg_req_t *q = &r[i / 4];
        snprintf(key, sizeof(key), "c%d", i);
        CHECK(mg_limit_conc_acquire(q, z, key, strlen(key), 1, &cur) == MG_OK && cur == 1);
    }
    CHECK(mg_limit_conc_acquire(&r[1], z, "c9", 2, 1, &cur) == MG_EINVAL); /* 4 per request */
    CHECK(mg_limit_take(z, "more", 4, &s, 1, T0 + 62 * SEC, &o) == MG_EFULL);
    mg__limit_conc_release(&r[0]);
    CHECK(r[0].nconc == 0);
    CHECK(take(z, "more", &s, 1, T0 + 62 * SEC, &o)); /* a released slot's entry is reused */
    mg__limit_conc_release(&r[1]);
    free(r);
}

static void test_concurrency(mg_shm_zone_t *z)
{
    mg_req_t *r = calloc(3, sizeof(mg_req_t));
    int64_t cur = -1;

    CHECK(mg_limit_conc_acquire(&r[0], z, "conc", 4, 2, &cur) == MG_OK && cur == 1);
    CHECK(mg_limit_conc_acquire(&r[1], z, "conc", 4, 2, &cur) == MG_OK && cur == 2);
    CHECK(mg_limit_conc_acquire(&r[2], z, "conc", 4, 2, &cur) == MG_DECLINED && cur == 2);
    CHECK(r[2].nconc == 0); /* a refusal holds nothing */
    mg__limit_conc_release(&r[0]);
    mg__limit_conc_release(&r[0]); /* released once only */
    CHECK(mg_limit_conc_acquire(&r[2], z, "conc", 4, 2, &cur) == MG_OK && cur == 2);
    mg__limit_conc_release(&r[1]);
    mg__limit_conc_release(&r[2]);
    CHECK(mg_limit_conc_acquire(&r[0], z, "conc", 4, 2, &cur) == MG_OK && cur == 1);
    mg__limit_conc_release(&r[0]);
    CHECK(mg_limit_conc_acquire(NULL, z, "conc", 4, 2, &cur) == MG_EINVAL);
    free(r);
}

static void test_take_all(mg_shm_zone_t *z)
{
    mg_limit_spec_t tenant = win(MG_LIMIT_FIXED_WINDOW, 10, SEC);
    mg_limit_spec_t consumer = tb(1, 3);
    mg_limit_spec_t route = win(MG_LIMIT_SLIDING_WINDOW, 5, SEC);
    mg_shm_zone_t *zones[3] = {z, z, z};
    const char *keys[3] = {"t:acme", "c:alice", "r:demo"};
    size_t lens[3] = {6, 7, 6};
    const mg_limit_spec_t *specs[3] = {&tenant, &consumer, &route};
    mg_limit_result_t o[3], one;
    int i;

    for (i = 0; i < 3; i++)
        CHECK(mg_limit_take_all(zones, keys, lens, specs, 3, 1, T0, o) == 0);
    CHECK(o[0].remaining == 7 && o[1].remaining == 0 && o[2].remaining == 2);
    /* the consumer level refuses: nothing is taken at the others */
    CHECK(mg_limit_take_all(zones, keys, lens, specs, 3, 1, T0, o) == 2);
    CHECK(!o[1].allowed && near(o[1].retry_after, 1));
    CHECK(o[0].allowed && o[0].remaining == 7); /* what it has, not what it would have */
    CHECK(o[2].allowed && o[2].remaining == 2);
    CHECK(take(z, "t:acme", &tenant, 0, T0, &one) && one.remaining == 7);
    CHECK(take(z, "r:demo", &route, 0, T0, &one) && one.remaining == 2);
    /* the route level refuses a take of 3 */
    CHECK(take(z, "r:demo", &route, 3, T0 + 10 * SEC, &one));
    CHECK(mg_limit_take_all(zones, keys, lens, specs, 3, 3, T0 + 10 * SEC, o) == 3);
    CHECK(take(z, "c:alice", &consumer, 0, T0 + 10 * SEC, &one) && one.remaining == 3);
    /* one key at two levels counts twice against its entry */
    const char *twice[2] = {"dup", "dup"};
    size_t twice_len[2] = {3, 3};
    const mg_limit_spec_t *dup[2] = {&tenant, &tenant};
    CHECK(mg_limit_take_all(zones, twice, twice_len, dup, 2, 5, T0, o) == 0);
    CHECK(o[1].remaining == 0);
    CHECK(mg_limit_take_all(zones, twice, twice_len, dup, 2, 1, T0, o) == 1);
    /* bad input */
    CHECK(mg_limit_take_all(zones, keys, lens, specs, 0, 1, T0, o) == MG_EINVAL);
    CHECK(mg_limit_take_all(zones, keys, lens, specs, 9, 1, T0, o) == MG_EINVAL);
    zones[1] = NULL;
    CHECK(mg_limit_take_all(zones, keys, lens, specs, 3, 1, T0, o) == MG_EINVAL);

    /* all levels in one set of a one-set zone: none evicts another */
    mg_shm_zone_t *one_set = mg__shm_zone_new("one-set-2", 4096);
    mg_shm_zone_t *zz[8];
    const char *kk[8] = {"a", "b", "c", "d", "e", "f", "g", "h"};
    size_t ll[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    const mg_limit_spec_t *ss[8];
    mg_limit_result_t oo[8];
    for (i = 0; i < 8; i++) {
        zz[i] = one_set;
        ss[i] = &tenant;
    }
    CHECK(mg_limit_take_all(zz, kk, ll, ss, 8, 1, T0, oo) == 0);
    CHECK(mg_limit_take_all(zz, kk, ll, ss, 8, 1, T0, oo) == 0);
    for (i = 0; i < 8; i++)
        CHECK(oo[i].remaining == 8);
}

static mg_breaker_conf_t brk_conf(void)
{
    mg_breaker_conf_t c = {.window_ms = 10000,
                           .min_requests = 4,
                           .failure_rate = 0.5,
                           .slow_ms = 0,
                           .slow_rate = 0,
                           .open_ms = 30000,
                           .max_open_ms = 0,
                           .probes = 2,
                           .close_after = 3};
    return c;
}

static void test_breaker(mg_shm_zone_t *z)
{
    mg_breaker_conf_t c = brk_conf();
    mg_breaker_result_t o;
    const char *k = "10.0.0.1:80";
    size_t kl = strlen(k);
    int64_t t = T0;
    int i;

    CHECK(mg_breaker_state(z, k, kl, t) == MG_BREAKER_CLOSED);
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && o.allowed && !o.probe);
    /* 1 failure in 3: below min_requests, then below the rate */
    CHECK(mg_breaker_report(z, k, kl, &c, 1, 5, 0, t) == 0);
    CHECK(mg_breaker_report(z, k, kl, &c, 0, 5, 0, t) == 0);
    CHECK(mg_breaker_report(z, k, kl, &c, 0, 5, 0, t) == 0);
    CHECK(mg_breaker_report(z, k, kl, &c, 0, 5, 0, t) == 0);
    CHECK(mg_breaker_state(z, k, kl, t) == MG_BREAKER_CLOSED);
    /* the window rolls: 11 s later those 4 are gone, 2 failures of 4 open it */
    t += 11 * SEC;
    CHECK(mg_breaker_report(z, k, kl, &c, 1, 5, 0, t) == 0);
    CHECK(mg_breaker_report(z, k, kl, &c, 1, 5, 0, t) == 0);
    CHECK(mg_breaker_report(z, k, kl, &c, 0, 5, 0, t) == 0);
    CHECK(mg_breaker_state(z, k, kl, t) == MG_BREAKER_CLOSED);
    CHECK(mg_breaker_report(z, k, kl, &c, 0, 5, 0, t) == 0);
    CHECK(mg_breaker_state(z, k, kl, t) == MG_BREAKER_OPEN);
    CHECK(mg_breaker_acquire(z, k, kl, &c, t + SEC, &o) == 0 && !o.allowed);
    CHECK(o.state == MG_BREAKER_OPEN && near(o.retry_after, 29));
    /* half-open after open_ms: 2 probes at most */
    t += 30 * SEC;
    CHECK(mg_breaker_state(z, k, kl, t) == MG_BREAKER_HALF_OPEN);
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && o.allowed && o.probe);
    CHECK(o.state == MG_BREAKER_HALF_OPEN);
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && o.allowed && o.probe);
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && !o.allowed);
    /* 3 consecutive successes close it */
    CHECK(mg_breaker_report(z, k, kl, &c, 0, 5, 1, t) == 0);
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && o.allowed && o.probe);
    CHECK(mg_breaker_report(z, k, kl, &c, 0, 5, 1, t) == 0);
    CHECK(mg_breaker_state(z, k, kl, t) == MG_BREAKER_HALF_OPEN);
    CHECK(mg_breaker_report(z, k, kl, &c, 0, 5, 1, t) == 0);
    CHECK(mg_breaker_state(z, k, kl, t) == MG_BREAKER_CLOSED);
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && o.allowed && !o.probe);
    /* closing emptied the window: one failure does not reopen it */
    CHECK(mg_breaker_report(z, k, kl, &c, 1, 5, 0, t) == 0);
    CHECK(mg_breaker_state(z, k, kl, t) == MG_BREAKER_CLOSED);

    /* a probe failure reopens; with max_open_ms the open time doubles */
    const char *k2 = "growth";
    size_t k2l = strlen(k2);
    c.max_open_ms = 100000;
    t = T0;
    for (i = 0; i < 4; i++)
        mg_breaker_report(z, k2, k2l, &c, 1, 5, 0, t);
    CHECK(mg_breaker_acquire(z, k2, k2l, &c, t, &o) == 0 && !o.allowed && near(o.retry_after, 30));
    int64_t expect[] = {60, 100, 100};
    for (i = 0; i < 3; i++) {
        t += 101 * SEC;
        CHECK(mg_breaker_acquire(z, k2, k2l, &c, t, &o) == 0 && o.probe);
        CHECK(mg_breaker_report(z, k2, k2l, &c, 1, 5, 1, t) == 0);
        CHECK(mg_breaker_acquire(z, k2, k2l, &c, t, &o) == 0 && !o.allowed);
        CHECK(near(o.retry_after, (double)expect[i]));
    }
    /* closing resets the growth */
    t += 101 * SEC;
    for (i = 0; i < 3; i++) {
        CHECK(mg_breaker_acquire(z, k2, k2l, &c, t, &o) == 0 && o.probe);
        CHECK(mg_breaker_report(z, k2, k2l, &c, 0, 5, 1, t) == 0);
    }
    CHECK(mg_breaker_state(z, k2, k2l, t) == MG_BREAKER_CLOSED);
    for (i = 0; i < 4; i++)
        mg_breaker_report(z, k2, k2l, &c, 1, 5, 0, t);
    CHECK(mg_breaker_acquire(z, k2, k2l, &c, t, &o) == 0 && !o.allowed && near(o.retry_after, 30));

    /* slow calls: slow_rate opens it, and a slow probe fails */
    const char *k3 = "slow";
    size_t k3l = strlen(k3);
    c = brk_conf();
    c.slow_ms = 1000;
    c.slow_rate = 0.75;
    t = T0;
    for (i = 0; i < 3; i++)
        mg_breaker_report(z, k3, k3l, &c, 0, 1500, 0, t);
    CHECK(mg_breaker_state(z, k3, k3l, t) == MG_BREAKER_CLOSED); /* 3 < min_requests */
    mg_breaker_report(z, k3, k3l, &c, 0, 999, 0, t);
    CHECK(mg_breaker_state(z, k3, k3l, t) == MG_BREAKER_OPEN); /* 3 slow of 4 */
    t += 30 * SEC;
    CHECK(mg_breaker_acquire(z, k3, k3l, &c, t, &o) == 0 && o.probe);
    CHECK(mg_breaker_report(z, k3, k3l, &c, 0, 2000, 1, t) == 0);
    CHECK(mg_breaker_state(z, k3, k3l, t) == MG_BREAKER_OPEN);

    /* lost probes: slots come back after open_ms */
    const char *k4 = "lost";
    size_t k4l = strlen(k4);
    c = brk_conf();
    t = T0;
    for (i = 0; i < 4; i++)
        mg_breaker_report(z, k4, k4l, &c, 1, 5, 0, t);
    t += 30 * SEC;
    CHECK(mg_breaker_acquire(z, k4, k4l, &c, t, &o) == 0 && o.probe);
    CHECK(mg_breaker_acquire(z, k4, k4l, &c, t, &o) == 0 && o.probe);
    CHECK(mg_breaker_acquire(z, k4, k4l, &c, t + 29 * SEC, &o) == 0 && !o.allowed);
    CHECK(mg_breaker_acquire(z, k4, k4l, &c, t + 31 * SEC, &o) == 0 && o.probe);

    /* bad input; a zone of small entries cannot hold breakers */
    c.probes = 0;
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == MG_EINVAL);
    c = brk_conf();
    CHECK(mg_breaker_acquire(mg_shm_zone("limits", 6), k, kl, &c, t, &o) == MG_EINVAL);
}

/* What the proxy adds (proxy_breaker.c): a probe released with no verdict
 * gives its slot back and counts nothing; the upstream breaker's checks. */
static void test_breaker_release(mg_shm_zone_t *z)
{
    mg_breaker_conf_t c = brk_conf();
    mg_breaker_result_t o;
    const char *k = "release";
    size_t kl = strlen(k);
    int64_t t = T0;
    int i;

    c.probes = 1;
    c.close_after = 1;
    CHECK(mg__breaker_release(z, k, kl, t) == 0); /* unknown key: nothing to do */
    for (i = 0; i < 4; i++)
        mg_breaker_report(z, k, kl, &c, 1, 5, 0, t);
    t += 30 * SEC;
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && o.probe);
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && !o.allowed);
    CHECK(mg__breaker_release(z, k, kl, t) == 0);
    CHECK(mg_breaker_state(z, k, kl, t) == MG_BREAKER_HALF_OPEN);   /* no verdict */
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && o.probe); /* the slot is back */
    CHECK(mg__breaker_release(z, k, kl, t) == 0);
    CHECK(mg__breaker_release(z, k, kl, t) == 0); /* never below 0 */
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && o.probe);
    CHECK(mg_breaker_acquire(z, k, kl, &c, t, &o) == 0 && !o.allowed);

    int ok[] = {500, 429}, bad[] = {99}, big[] = {1000};
    mg_upstream_breaker_t *b = mg_upstream_breaker_new(z, &c, ok, 2);
    CHECK(b != NULL);
    if (b != NULL) {
        CHECK((b->failure[500 / 8] >> (500 % 8) & 1) && (b->failure[429 / 8] >> (429 % 8) & 1));
        CHECK(!(b->failure[503 / 8] >> (503 % 8) & 1));
        mg_upstream_breaker_release(b);
    }
    CHECK(mg_upstream_breaker_new(z, &c, bad, 1) == NULL);
    CHECK(mg_upstream_breaker_new(z, &c, big, 1) == NULL);
    CHECK(mg_upstream_breaker_new(mg_shm_zone("limits", 6), &c, ok, 2) == NULL);
    c.open_ms = 0;
    CHECK(mg_upstream_breaker_new(z, &c, ok, 2) == NULL);
}

/* A child takes a set's lock and is SIGKILLed holding it: the next locker
 * recovers the lock and the entries in that set keep their state. */
static void test_robust(mg_shm_zone_t *z)
{
    mg_limit_spec_t s = win(MG_LIMIT_FIXED_WINDOW, 5, 60 * SEC);
    mg_limit_result_t o;
    mg_shm_key_t k;
    int pipefd[2], status;
    char c;
    pid_t pid;

    CHECK(take(z, "robust", &s, 2, T0, &o));
    mg__shm_key(z, "robust", 6, MG_LIMIT_FIXED_WINDOW, &k);
    CHECK(pipe(pipefd) == 0);
    pid = fork();
    if (pid == 0) {
        mg__shm_lock(z, k.set);
        if (write(pipefd[1], "x", 1) != 1) _exit(1);
        pause();
        _exit(0);
    }
    CHECK(read(pipefd[0], &c, 1) == 1); /* the child holds the lock */
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    uint64_t before = atomic_load(&z->recovered);
    CHECK(take(z, "robust", &s, 3, T0 + 1, &o) && o.remaining == 0);
    CHECK(atomic_load(&z->recovered) == before + 1);
    CHECK(!take(z, "robust", &s, 1, T0 + 2, &o)); /* and the lock works after */
    close(pipefd[0]);
    close(pipefd[1]);
}

/* NPROC processes take 1 from one key TAKES times each; the admitted
 * total is exact. */
#define NPROC 2
#define TAKES 1000000

static long multi(mg_shm_zone_t *z, const char *key, const mg_limit_spec_t *s)
{
    long *admitted =
        mmap(NULL, sizeof(long) * NPROC, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    long total = 0;
    int i, status;

    for (i = 0; i < NPROC; i++) {
        if (fork() == 0) {
            mg_limit_result_t o;
            long n = 0;
            for (int j = 0; j < TAKES; j++) {
                if (mg_limit_take(z, key, strlen(key), s, 1, T0, &o) == MG_OK && o.allowed) n++;
            }
            admitted[i] = n;
            _exit(0);
        }
    }
    for (i = 0; i < NPROC; i++) {
        wait(&status);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    for (i = 0; i < NPROC; i++)
        total += admitted[i];
    munmap(admitted, sizeof(long) * NPROC);
    return total;
}

static void test_multiprocess(mg_shm_zone_t *z)
{
    mg_limit_spec_t big = win(MG_LIMIT_FIXED_WINDOW, 3 * TAKES, 60 * SEC);
    mg_limit_spec_t small = tb(1e-9, 1234567); /* no refill at one instant */
    mg_limit_result_t o;

    CHECK(multi(z, "multi", &big) == (long)NPROC * TAKES);
    CHECK(take(z, "multi", &big, 0, T0, &o) && o.remaining == 3.0 * TAKES - NPROC * TAKES);
    CHECK(multi(z, "multi-l", &small) == 1234567);
    CHECK(!take(z, "multi-l", &small, 1, T0, &o) && o.remaining == 0);
}

int main(void)
{
    mg_shm_zone_t *lim, *brk;

    test_zones();
    lim = mg_shm_zone("limits", 6);
    brk = mg_shm_zone("breakers", 8);
    test_token_bucket(lim);
    test_fixed_window(lim);
    test_sliding_window(lim);
    test_keys(lim);
    test_eviction();
    test_concurrency(lim);
    test_take_all(lim);
    test_breaker(brk);
    test_breaker_release(brk);
    test_robust(lim);
    test_multiprocess(lim);
    return check_report();
}
