/* breaker.c: circuit breakers on shared-memory entries, one per key (an
 * upstream target), node-wide.
 *
 *   closed    calls pass; each outcome lands in a rolling window of
 *             BRK_BUCKETS buckets (window_ms / 10 each). When the window
 *             holds >= min_requests calls and failures / calls reaches
 *             failure_rate (or slow / calls reaches slow_rate), it opens.
 *   open      calls fail fast (retry_after = the open time left) for
 *             open_ms; then the next acquire makes it half-open.
 *   half-open at most `probes` calls in flight, each admitted as a probe;
 *             close_after consecutive probe successes close it (with an
 *             empty window); any probe failure reopens it, for twice the
 *             last open time when max_open_ms > open_ms (up to it).
 *
 * Probes whose report never comes (the worker died) would hold their slot
 * for ever: when every probe slot has been taken for longer than open_ms,
 * the slots are given back. A report of a probe admitted in an earlier
 * half-open period may land in a later one; it counts as that period's.
 *
 * The proxy calls these directly (plain C, one lock of one set, no
 * allocation); Lua reaches the same functions through the FFI.
 */
#include <string.h>

#include "shm.h"

#define BRK_BUCKETS 10

typedef struct {
    uint8_t state; /* MG_BREAKER_* */
    uint8_t pad;
    uint16_t successes; /* consecutive probe successes */
    uint32_t probes;    /* in flight */
    uint32_t open_ms;   /* of the current or last opening; 0: never opened */
    uint32_t pad2;
    int64_t open_until;  /* open: when it turns half-open */
    int64_t probe_since; /* half-open: when the probe slots last had room */
    int64_t epoch;       /* bucket index of the newest bucket */
    uint32_t total[BRK_BUCKETS], fail[BRK_BUCKETS], slow[BRK_BUCKETS];
} brk_state_t;

_Static_assert(sizeof(brk_state_t) <= MG_SHM_ENTRY_LARGE - MG_SHM_ENTRY_HEAD, "state fits");

int mg__breaker_conf_ok(const mg_breaker_conf_t *c)
{
    return c != NULL && c->window_ms >= BRK_BUCKETS && c->open_ms > 0 && c->probes > 0 &&
           c->close_after > 0 && c->failure_rate > 0 && c->slow_rate >= 0;
}

static inline int64_t brk_bucket_us(const mg_breaker_conf_t *c)
{
    return (int64_t)c->window_ms * 1000 / BRK_BUCKETS;
}

/* Moves the window to now: buckets older than the window are emptied. */
static void brk_advance(brk_state_t *b, const mg_breaker_conf_t *c, int64_t now)
{
    int64_t epoch = now / brk_bucket_us(c);

    if (epoch <= b->epoch) return;
    if (epoch - b->epoch >= BRK_BUCKETS) {
        memset(b->total, 0, sizeof(b->total));
        memset(b->fail, 0, sizeof(b->fail));
        memset(b->slow, 0, sizeof(b->slow));
    } else {
        for (int64_t i = b->epoch + 1; i <= epoch; i++) {
            int k = (int)(i % BRK_BUCKETS);
            b->total[k] = b->fail[k] = b->slow[k] = 0;
        }
    }
    b->epoch = epoch;
}

static void brk_clear_window(brk_state_t *b)
{
    memset(b->total, 0, sizeof(b->total));
    memset(b->fail, 0, sizeof(b->fail));
    memset(b->slow, 0, sizeof(b->slow));
}

static void brk_open(brk_state_t *b, const mg_breaker_conf_t *c, int64_t now, int reopen)
{
    uint32_t ms = c->open_ms;
    if (reopen && c->max_open_ms > c->open_ms && b->open_ms >= c->open_ms) {
        uint64_t twice = (uint64_t)b->open_ms * 2;
        ms = twice > c->max_open_ms ? c->max_open_ms : (uint32_t)twice;
    }
    b->state = MG_BREAKER_OPEN;
    b->open_ms = ms;
    b->open_until = now + (int64_t)ms * 1000;
    b->probes = 0;
    b->successes = 0;
}

/* When the state equals a fresh entry's: closed with nothing in the window.
 * An open or half-open breaker never does (it may still be evicted, as the
 * least recently used entry of a full set, and that is counted). */
static int64_t brk_expires(const brk_state_t *b, const mg_breaker_conf_t *c)
{
    if (b->state != MG_BREAKER_CLOSED) return MG_SHM_PINNED - 1;
    return (b->epoch + 1) * brk_bucket_us(c) + (int64_t)c->window_ms * 1000;
}

/* Locks the key's set and finds (or creates) its entry. */
static mg_shm_entry_t *brk_entry(mg_shm_zone_t *z, const char *key, size_t len, int create,
                                 int64_t now, mg_shm_key_t *k, int *err)
{
    uint32_t slot;
    mg_shm_entry_t *e;

    mg__shm_key(z, key, len, MG_SHM_BREAKER, k);
    if (mg__shm_lock(z, k->set) < 0) {
        *err = MG_ERROR;
        return NULL;
    }
    e = mg__shm_get(z, k, create, now, NULL, 0, &slot, err);
    if (e == NULL) mg__shm_unlock(z, k->set);
    return e;
}

static int brk_args_ok(mg_shm_zone_t *z, const char *key, size_t len)
{
    return z != NULL && (key != NULL || len == 0) && mg__shm_value_size(z) >= sizeof(brk_state_t);
}

int mg__breaker_zone_ok(mg_shm_zone_t *z)
{
    return brk_args_ok(z, "", 0);
}

int mg_breaker_acquire(mg_shm_zone_t *z, const char *key, size_t key_len,
                       const mg_breaker_conf_t *conf, int64_t now_us, mg_breaker_result_t *out)
{
    mg_shm_key_t k;
    mg_shm_entry_t *e;
    brk_state_t *b;
    int err = 0;

    if (!brk_args_ok(z, key, key_len) || !mg__breaker_conf_ok(conf) || out == NULL)
        return MG_EINVAL;
    if (now_us <= 0) now_us = mg__shm_now_us();
    /* A key never reported is closed: no entry is made for it here, so
     * acquires alone never fill the zone. */
    e = brk_entry(z, key, key_len, 0, now_us, &k, &err);
    out->allowed = 1;
    out->probe = 0;
    out->state = MG_BREAKER_CLOSED;
    out->retry_after = 0;
    if (e == NULL) return err == MG_DECLINED ? MG_OK : err;

    b = (brk_state_t *)e->value;
    if (b->state == MG_BREAKER_OPEN && now_us >= b->open_until) {
        b->state = MG_BREAKER_HALF_OPEN;
        b->probes = 0;
        b->successes = 0;
        b->probe_since = now_us;
    }
    if (b->state == MG_BREAKER_OPEN) {
        out->allowed = 0;
        out->retry_after = (double)(b->open_until - now_us) / 1e6;
    } else if (b->state == MG_BREAKER_HALF_OPEN) {
        if (b->probes >= conf->probes && now_us - b->probe_since > (int64_t)conf->open_ms * 1000)
            b->probes = 0; /* lost probes (see the top of the file) */
        if (b->probes < conf->probes) {
            if (b->probes == 0) b->probe_since = now_us;
            b->probes++;
            out->probe = 1;
        } else {
            out->allowed = 0;
            out->retry_after = 1; /* a probe slot frees when a probe reports */
        }
    }
    out->state = b->state;
    e->expires_us = brk_expires(b, conf);
    mg__shm_unlock(z, k.set);
    return MG_OK;
}

int mg_breaker_report(mg_shm_zone_t *z, const char *key, size_t key_len,
                      const mg_breaker_conf_t *conf, int failed, double duration_ms, int was_probe,
                      int64_t now_us)
{
    mg_shm_key_t k;
    mg_shm_entry_t *e;
    brk_state_t *b;
    int err = 0, slow;

    if (!brk_args_ok(z, key, key_len) || !mg__breaker_conf_ok(conf)) return MG_EINVAL;
    if (now_us <= 0) now_us = mg__shm_now_us();
    e = brk_entry(z, key, key_len, 1, now_us, &k, &err);
    if (e == NULL) return err;
    b = (brk_state_t *)e->value;
    slow = conf->slow_ms > 0 && duration_ms >= (double)conf->slow_ms;

    if (was_probe && b->state == MG_BREAKER_HALF_OPEN) {
        if (b->probes > 0) b->probes--;
        /* a slow probe fails when slow calls can open the breaker */
        if (failed || (slow && conf->slow_rate > 0)) {
            brk_open(b, conf, now_us, 1);
        } else if (++b->successes >= conf->close_after) {
            b->state = MG_BREAKER_CLOSED;
            b->successes = 0;
            b->probes = 0;
            b->open_ms = 0; /* the next opening starts from open_ms again */
            brk_clear_window(b);
            b->epoch = now_us / brk_bucket_us(conf);
        }
    } else if (!was_probe) {
        int i;
        brk_advance(b, conf, now_us);
        i = (int)(b->epoch % BRK_BUCKETS);
        b->total[i]++;
        b->fail[i] += failed != 0;
        b->slow[i] += slow;
        if (b->state == MG_BREAKER_CLOSED) {
            uint64_t total = 0, fails = 0, slows = 0;
            for (i = 0; i < BRK_BUCKETS; i++) {
                total += b->total[i];
                fails += b->fail[i];
                slows += b->slow[i];
            }
            if (total >= conf->min_requests && total > 0 &&
                ((double)fails >= conf->failure_rate * (double)total ||
                 (conf->slow_rate > 0 && (double)slows >= conf->slow_rate * (double)total))) {
                brk_open(b, conf, now_us, 0);
                brk_clear_window(b);
            }
        }
    }
    e->expires_us = brk_expires(b, conf);
    mg__shm_unlock(z, k.set);
    return MG_OK;
}

int mg_breaker_state(mg_shm_zone_t *z, const char *key, size_t key_len, int64_t now_us)
{
    mg_shm_key_t k;
    mg_shm_entry_t *e;
    int err = 0, state;

    if (!brk_args_ok(z, key, key_len)) return MG_EINVAL;
    if (now_us <= 0) now_us = mg__shm_now_us();
    e = brk_entry(z, key, key_len, 0, now_us, &k, &err);
    if (e == NULL) return err == MG_DECLINED ? MG_BREAKER_CLOSED : err;
    const brk_state_t *b = (const brk_state_t *)e->value;
    state = b->state;
    if (state == MG_BREAKER_OPEN && now_us >= b->open_until) state = MG_BREAKER_HALF_OPEN;
    mg__shm_unlock(z, k.set);
    return state;
}

int mg__breaker_release(mg_shm_zone_t *z, const char *key, size_t key_len, int64_t now_us)
{
    mg_shm_key_t k;
    mg_shm_entry_t *e;
    int err = 0;

    if (!brk_args_ok(z, key, key_len)) return MG_EINVAL;
    if (now_us <= 0) now_us = mg__shm_now_us();
    e = brk_entry(z, key, key_len, 0, now_us, &k, &err);
    if (e == NULL) return err == MG_DECLINED ? MG_OK : err;
    brk_state_t *b = (brk_state_t *)e->value;
    /* Only the half-open period's count: a probe of an earlier period
     * that lands here frees a slot of this one, as its report would. */
    if (b->state == MG_BREAKER_HALF_OPEN && b->probes > 0) b->probes--;
    mg__shm_unlock(z, k.set);
    return MG_OK;
}
