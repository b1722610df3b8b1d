/* limit.c: rate limits and concurrency limits on shared-memory entries.
 *
 * Each algorithm is a pure step on a copy of the entry's state (limit_step),
 * so one take and an all-or-nothing take of several levels share the code:
 * lock the sets, step every level on a copy, write the copies back only
 * when every level admitted.
 *
 * States (all zero = a fresh key, which is what a new entry holds):
 *   token bucket   level (units taken and not yet refilled), last refill;
 *                  tokens = burst - level, refilled continuously at rate/s
 *   fixed window   window index (now / window), units taken in it
 *   sliding window window index, units in it and in the previous one;
 *                  count = prev * (1 - elapsed / window) + cur
 * Times are CLOCK_MONOTONIC microseconds, shared by the processes of one
 * machine. A caller whose clock reads a little behind the stored one (two
 * workers racing) is treated as "now = stored time": state never goes back.
 */
#include <math.h>
#include <string.h>

#include "mg.h"
#include "shm.h"

#define LIMIT_MAX_LEVELS 8
#define CONC_MAX 4 /* concurrency slots per request */

typedef struct {
    double level;
    int64_t last_us;
} tb_state_t;

typedef struct {
    int64_t win;
    double count;
} fw_state_t;

typedef struct {
    int64_t win;
    double cur;
    double prev;
} sw_state_t;

typedef struct {
    int64_t count;
} conc_state_t;

typedef union {
    tb_state_t tb;
    fw_state_t fw;
    sw_state_t sw;
} limit_state_t;

_Static_assert(sizeof(limit_state_t) <= MG_SHM_ENTRY_SMALL - MG_SHM_ENTRY_HEAD, "state fits");

static int limit_spec_ok(const mg_limit_spec_t *s)
{
    if (s == NULL || !(s->limit >= 0) || !isfinite(s->limit)) return 0;
    switch (s->algorithm) {
    case MG_LIMIT_TOKEN_BUCKET: return s->rate > 0 && isfinite(s->rate);
    case MG_LIMIT_FIXED_WINDOW:
    case MG_LIMIT_SLIDING_WINDOW: return s->window_us > 0;
    default: return 0;
    }
}

/* One take of n on st (a copy); fills out, returns the time from which the
 * new state equals a fresh one (the entry's expiry). */
static int64_t limit_step(const mg_limit_spec_t *s, limit_state_t *st, double n, int64_t now,
                          mg_limit_result_t *out)
{
    double lim = s->limit;

    out->limit = lim;
    out->retry_after = 0;
    switch (s->algorithm) {
    case MG_LIMIT_TOKEN_BUCKET: {
        tb_state_t *b = &st->tb;
        if (now > b->last_us) {
            b->level -= s->rate * (double)(now - b->last_us) / 1e6;
            if (b->level < 0) b->level = 0;
            b->last_us = now;
        }
        if (b->level > lim) b->level = lim; /* burst lowered by a reload */
        out->allowed = b->level + n <= lim;
        if (out->allowed) {
            b->level += n;
        } else {
            out->retry_after = n > lim ? -1 : (b->level + n - lim) / s->rate;
        }
        out->remaining = floor(lim - b->level);
        out->reset = b->level / s->rate;
        return b->last_us + (int64_t)ceil(out->reset * 1e6);
    }
    case MG_LIMIT_FIXED_WINDOW: {
        fw_state_t *w = &st->fw;
        int64_t win = now / s->window_us;
        if (win > w->win) {
            w->win = win;
            w->count = 0;
        }
        int64_t end = (w->win + 1) * s->window_us;
        out->allowed = w->count + n <= lim;
        if (out->allowed) w->count += n;
        out->remaining = floor(lim - w->count);
        out->reset = (double)(end - (now < end ? now : end)) / 1e6;
        if (!out->allowed) out->retry_after = n > lim ? -1 : out->reset;
        return end;
    }
    case MG_LIMIT_SLIDING_WINDOW: {
        sw_state_t *w = &st->sw;
        double W = (double)s->window_us;
        int64_t win = now / s->window_us;
        if (win == w->win + 1) {
            w->prev = w->cur;
            w->cur = 0;
        } else if (win > w->win + 1) {
            w->prev = w->cur = 0;
        }
        if (win > w->win) w->win = win;
        double e = (double)(now - w->win * s->window_us);
        if (e < 0) e = 0;
        if (e > W) e = W;
        double count = w->prev * (W - e) / W + w->cur;
        out->allowed = count + n <= lim;
        if (out->allowed) {
            w->cur += n;
            count += n;
        } else if (n > lim) {
            out->retry_after = -1;
        } else if (w->cur + n <= lim) {
            /* within this window, once prev's weight has dropped enough:
             * prev * (W - e - t) / W + cur + n <= lim */
            double t = (W - e) - (lim - w->cur - n) * W / w->prev;
            out->retry_after = (t > 0 ? t : 0) / 1e6;
        } else {
            /* in the next window, cur becomes prev: cur * (W - t) / W + n <= lim */
            double t = W - (lim - n) * W / w->cur;
            out->retry_after = ((W - e) + (t > 0 ? t : 0)) / 1e6;
        }
        out->remaining = lim - count > 0 ? floor(lim - count) : 0;
        out->reset = (W - e) / 1e6;
        return (w->win + 2) * s->window_us;
    }
    }
    return now;
}

static int limit_n_ok(double n)
{
    return n >= 0 && isfinite(n);
}

int mg_limit_take(mg_shm_zone_t *z, const char *key, size_t key_len, const mg_limit_spec_t *spec,
                  double n, int64_t now_us, mg_limit_result_t *out)
{
    mg_shm_key_t k;
    mg_shm_entry_t *e;
    limit_state_t st;
    uint32_t slot;
    int64_t exp;
    int err = 0;

    if (z == NULL || (key == NULL && key_len) || !limit_spec_ok(spec) || !limit_n_ok(n) ||
        out == NULL)
        return MG_EINVAL;
    if (now_us <= 0) now_us = mg__shm_now_us();
    mg__shm_key(z, key, key_len, spec->algorithm, &k);
    if (mg__shm_lock(z, k.set) < 0) return MG_ERROR;
    e = mg__shm_get(z, &k, 1, now_us, NULL, 0, &slot, &err);
    if (e == NULL) {
        mg__shm_unlock(z, k.set);
        return err;
    }
    memcpy(&st, e->value, sizeof(st));
    exp = limit_step(spec, &st, n, now_us, out);
    memcpy(e->value, &st, sizeof(st));
    e->expires_us = exp;
    mg__shm_unlock(z, k.set);
    return MG_OK;
}

/* --- all or nothing ----------------------------------------------------------- */

typedef struct {
    mg_shm_zone_t *z;
    mg_shm_key_t k;
    mg_shm_entry_t *e;
    int first; /* the level whose copy this one shares (same entry), or itself */
} level_t;

/* The lock order: (zone id, set), the same in every process, so two
 * callers locking overlapping sets never wait for each other in a cycle. */
static int level_before(const level_t *a, const level_t *b)
{
    return a->z->id != b->z->id ? a->z->id < b->z->id : a->k.set < b->k.set;
}

static int level_same_set(const level_t *a, const level_t *b)
{
    return a->z == b->z && a->k.set == b->k.set;
}

int mg_limit_take_all(mg_shm_zone_t *const *zones, const char *const *keys, const size_t *key_lens,
                      const mg_limit_spec_t *const *specs, uint32_t count, double n, int64_t now_us,
                      mg_limit_result_t *out)
{
    level_t lv[LIMIT_MAX_LEVELS];
    int order[LIMIT_MAX_LEVELS], nlocked = 0, i, j, refused = 0, rc = MG_OK;
    limit_state_t st[LIMIT_MAX_LEVELS];
    int64_t exp[LIMIT_MAX_LEVELS];

    if (count == 0 || count > LIMIT_MAX_LEVELS || !limit_n_ok(n) || out == NULL) return MG_EINVAL;
    for (i = 0; i < (int)count; i++) {
        if (zones[i] == NULL || (keys[i] == NULL && key_lens[i]) || !limit_spec_ok(specs[i]))
            return MG_EINVAL;
    }
    if (now_us <= 0) now_us = mg__shm_now_us();
    for (i = 0; i < (int)count; i++) {
        lv[i].z = zones[i];
        mg__shm_key(zones[i], keys[i], key_lens[i], specs[i]->algorithm, &lv[i].k);
        lv[i].e = NULL;
        /* insertion sort of at most 8 */
        for (j = i; j > 0 && level_before(&lv[i], &lv[order[j - 1]]); j--)
            order[j] = order[j - 1];
        order[j] = i;
    }
    /* Lock each distinct set once, in order. */
    for (i = 0; i < (int)count; i++) {
        const level_t *l = &lv[order[i]];
        if (i > 0 && level_same_set(l, &lv[order[i - 1]])) continue;
        if (mg__shm_lock(l->z, l->k.set) < 0) {
            nlocked = i; /* the positions before this one hold their locks */
            rc = MG_ERROR;
            goto unlock;
        }
    }
    nlocked = (int)count;
    /* Find or create every entry; entries found for other levels of the
     * same set are kept from eviction. */
    for (i = 0; i < (int)count; i++) {
        mg_shm_entry_t *keep[LIMIT_MAX_LEVELS];
        int nkeep = 0, err = 0;
        uint32_t slot;
        for (j = 0; j < i; j++) {
            if (level_same_set(&lv[i], &lv[j])) keep[nkeep++] = lv[j].e;
        }
        lv[i].e = mg__shm_get(lv[i].z, &lv[i].k, 1, now_us, keep, nkeep, &slot, &err);
        if (lv[i].e == NULL) {
            rc = err;
            goto unlock;
        }
        lv[i].first = i;
        for (j = 0; j < i; j++) {
            if (lv[j].e == lv[i].e) {
                lv[i].first = lv[j].first;
                break;
            }
        }
        if (lv[i].first == i) memcpy(&st[i], lv[i].e->value, sizeof(st[i]));
    }
    /* Step every level on its copy (levels on one entry share a copy). */
    for (i = 0; i < (int)count; i++) {
        exp[lv[i].first] = limit_step(specs[i], &st[lv[i].first], n, now_us, &out[i]);
        if (!out[i].allowed && !refused) refused = i + 1;
    }
    if (!refused) {
        for (i = 0; i < (int)count; i++) {
            if (lv[i].first != i) continue;
            memcpy(lv[i].e->value, &st[i], sizeof(st[i]));
            lv[i].e->expires_us = exp[i];
        }
    } else {
        /* Nothing consumed: the levels that admitted report what they have
         * now, not what they would have had. */
        for (i = 0; i < (int)count; i++) {
            if (out[i].allowed) out[i].remaining += floor(n);
        }
    }
    rc = refused;

unlock:
    for (i = nlocked - 1; i >= 0; i--) {
        const level_t *l = &lv[order[i]];
        if (i > 0 && level_same_set(l, &lv[order[i - 1]])) continue;
        mg__shm_unlock(l->z, l->k.set);
    }
    return rc;
}

/* --- concurrency -------------------------------------------------------------- */

int mg_limit_conc_acquire(mg_req_t *r, mg_shm_zone_t *z, const char *key, size_t key_len,
                          uint32_t max, int64_t *current)
{
    mg_shm_key_t k;
    mg_shm_entry_t *e;
    conc_state_t *c;
    uint32_t slot;
    int err = 0, rc = MG_OK;
    int64_t now = mg__shm_now_us();

    if (r == NULL || z == NULL || (key == NULL && key_len)) return MG_EINVAL;
    if (r->nconc >= CONC_MAX) return MG_EINVAL;
    mg__shm_key(z, key, key_len, MG_SHM_CONCURRENCY, &k);
    if (mg__shm_lock(z, k.set) < 0) return MG_ERROR;
    e = mg__shm_get(z, &k, 1, now, NULL, 0, &slot, &err);
    if (e == NULL) {
        mg__shm_unlock(z, k.set);
        return err;
    }
    c = (conc_state_t *)e->value;
    if (c->count < 0) c->count = 0; /* a repaired entry */
    if ((uint64_t)c->count >= max) {
        rc = MG_DECLINED;
    } else {
        c->count++;
        /* held: the entry must outlive the request (never evicted) */
        e->expires_us = MG_SHM_PINNED;
        r->conc[r->nconc].zone = z;
        r->conc[r->nconc].slot = slot;
        r->nconc++;
    }
    if (current) *current = c->count;
    mg__shm_unlock(z, k.set);
    return rc;
}

void mg__limit_conc_release(mg_req_t *r)
{
    for (int i = 0; i < r->nconc; i++) {
        mg_shm_zone_t *z = r->conc[i].zone;
        uint32_t slot = r->conc[i].slot;
        mg_shm_entry_t *e = mg__shm_entry(z, slot);
        if (mg__shm_lock(z, slot / MG_SHM_WAYS) < 0) continue;
        conc_state_t *c = (conc_state_t *)e->value;
        /* A pinned entry is never evicted, so the slot still holds the key;
         * the kind check guards against a set repaired after a crash. */
        if (e->kind == MG_SHM_CONCURRENCY && c->count > 0 && --c->count == 0)
            e->expires_us = mg__shm_now_us();
        mg__shm_unlock(z, slot / MG_SHM_WAYS);
    }
    r->nconc = 0;
}
