/* route.c: the lookup of a route in the segment tries that
 * lua/moongate/router.lua compiles (its header comment gives the layout,
 * "records" and "parameter records" what they hold). The numbers below
 * are its constants: the ones route.c shares with it by name are in
 * moongate.h (MG_RT_*, read by router.lua); the others are written in both
 * files and must be changed in both (spec/01-unit/router_spec.lua compares
 * every answer with a linear scan of the routes: a mismatch fails it).
 *
 * A lookup reads the path once (segment boundaries, each segment's hash
 * and each body's key), then, per host bucket in order: the bucket's
 * records (an exact path, parameter shapes, prefixes from the longest
 * body down), which decide most lookups of a large router in one or two
 * cache lines; else a depth-first walk of its trie, the literal child
 * before the parameter child. Candidates are chains of entries, best
 * first; an entry with predicates is handed to Lua (MG_ROUTE_CHECK) and
 * the walk goes on from where it stopped when Lua calls again, so the
 * walk is the same as if C could check them: predicates are pure.
 * Everything is in C because the walk is a loop nested in the request's
 * code: in Lua it became the root trace that the rest of a lookup hung
 * from as side traces, and lookups ran 0.5-2x slower from one process to
 * the next depending on which paths got hot first (bench/router.lua).
 */
#include <limits.h>
#include <string.h>

#include "moongate.h"

/* a node (MG_RT_NODE int32) */
enum {
    N_MIN = 0, /* the lowest rank code in its subtree */
    N_PARAM,   /* the parameter child, or 0 */
    N_EXACT,   /* the best entry whose pattern ends here */
    N_PREFIX,  /* likewise, the patterns ending in "/" and a star */
    N_LEN,     /* the segment's length */
    N_OFF,     /* its offset in labels when not inline */
    N_EXACT_RANK,
    N_PREFIX_RANK,
    N_KHASH, /* the only child's segment hash (N_KMASK < 0) */
    N_KID,   /* the only child, or 0 */
    N_KOFF,  /* the children's table in karr */
    N_KMASK, /* its slot count - 1, or -1 */
};
#define N_INLINE_AT 48 /* bytes */
#define N_INLINE_MAX 16

/* a record (MG_RT_XREC int32) */
enum {
    X_KEY = 0, /* xmix(path key, tag) */
    X_TAG,     /* root * 4 + kind; 0: empty */
    X_HEAD,    /* the chain head, or 0 */
    X_RANK,    /* its rank code */
    X_LEN,     /* the path's length (a parameter record: its runs') */
    X_OFF,     /* the path's offset in labels when not inline */
    X_BEAT,    /* 1: the head is not decisive */
    X_FAR,     /* 1: a record whose home is this slot lies past the next */
};
#define X_P_PACK 5 /* shape + run0 length * 256 + run1 length * 2^20 */
#define X_P_OFF 8
#define X_INLINE_AT 36
#define X_INLINE_MAX 28
#define X_P_INLINE_AT 32
#define X_EXACT 0
#define X_PREFIX 1
#define X_PARAM 2
#define X_SEGS_MAX 255 /* segments of a path with parameter records */
#define GMULT 999331u  /* body keys: a polynomial of the segments' hashes */

#define SLASH '/'

/* where a walk stopped for a check */
enum { AT_NONE = 0, AT_RECORD, AT_NODE_PREFIX, AT_NODE_EXACT };

/* what a record lookup found */
#define R_NONE (-1) /* no record with a head, for sure */
#define R_WALK (-2) /* not found where a lookup looks: walk the trie */

static inline uint32_t xmix(uint32_t h, int32_t tag)
{
    uint32_t k = h ^ ((uint32_t)tag * 40503u);
    k = (k ^ (k >> 15)) * 113171u;
    return k ^ (k >> 16);
}

static inline uint32_t home(uint32_t h, int32_t mask)
{
    return (h ^ (h >> 16)) & (uint32_t)mask;
}

static uint32_t gpow(uint32_t n)
{
    uint32_t r = 1, b = GMULT;
    while (n) {
        if (n & 1) r *= b;
        b *= b;
        n >>= 1;
    }
    return r;
}

static inline int filtered_out(const mg_router_t *rt, uint32_t m)
{
    uint32_t b = m & (uint32_t)rt->xbmask;
    return ((uint32_t)rt->xbits[b >> 5] & (1u << (b & 31))) == 0;
}

static inline int rec_is(const mg_router_t *rt, int32_t base, uint32_t m, int32_t tag, int32_t len,
                         const char *path)
{
    const int32_t *xr = rt->xrec;
    if (xr[base + X_KEY] != (int32_t)m || xr[base + X_TAG] != tag || xr[base + X_LEN] != len)
        return 0;
    const uint8_t *p = len <= X_INLINE_MAX ? (const uint8_t *)xr + base * 4 + X_INLINE_AT
                                           : rt->labels + xr[base + X_OFF];
    return memcmp(path, p, (size_t)len) == 0;
}

/* The record (tag, the first len bytes of the path, key h) with a head:
 * its base; R_NONE when there is none; R_WALK when it may lie past the
 * slots a lookup reads (the home slot and the next). */
static int32_t look(const mg_route_walk_t *w, int32_t tag, int32_t len, uint32_t h)
{
    const mg_router_t *rt = w->rt;
    uint32_t m = xmix(h, tag);
    if (filtered_out(rt, m)) return R_NONE;
    int32_t s = (int32_t)(m & (uint32_t)rt->xmask);
    int32_t base = s * MG_RT_XREC;
    int32_t far = rt->xrec[base + X_FAR];
    if (!rec_is(rt, base, m, tag, len, w->path)) {
        base = ((s + 1) & rt->xmask) * MG_RT_XREC;
        if (!rec_is(rt, base, m, tag, len, w->path)) return far == 0 ? R_NONE : R_WALK;
    }
    return rt->xrec[base + X_HEAD] != 0 ? base : R_NONE;
}

static inline int p_rec_is(const int32_t *xr, int32_t base, uint32_t m, int32_t tag, int32_t shp)
{
    return xr[base + X_KEY] == (int32_t)m && xr[base + X_TAG] == tag &&
           (xr[base + X_P_PACK] & 255) == shp;
}

/* The parameter record of shape shp (p1 + p2 * 16: the segment numbers of
 * its parameters) of tag for the path: its base when found with a head,
 * else R_NONE (the prefix records and the walk do not rely on it). Its key
 * is the path's less the parameters' terms. */
static int32_t param_look(const mg_route_walk_t *w, int32_t tag, int32_t shp)
{
    const mg_router_t *rt = w->rt;
    const int32_t *bi = w->bnd_i, *xr = rt->xrec;
    int32_t p1 = shp & 15, p2 = shp >> 4, nb = w->nb, n = nb - 1;
    int32_t a1 = bi[p1 + 1];
    if (a1 == bi[p1] + 1) return R_NONE; /* a parameter takes a non-empty segment */
    uint32_t g = (uint32_t)w->bnd_g[nb] - ((uint32_t)w->seg_h[p1] + 1u) * gpow((uint32_t)(n - p1));
    int32_t len = bi[nb];
    int32_t b1 = len, a2 = len; /* the second run's end, the third's start */
    if (p2 > 0) {
        b1 = bi[p2];
        a2 = bi[p2 + 1];
        if (a2 == b1 + 1) return R_NONE;
        g -= ((uint32_t)w->seg_h[p2] + 1u) * gpow((uint32_t)(n - p2));
    }
    uint32_t m = xmix(g, tag);
    if (filtered_out(rt, m)) return R_NONE;
    int32_t s = (int32_t)(m & (uint32_t)rt->xmask);
    int32_t base = s * MG_RT_XREC;
    if (!p_rec_is(xr, base, m, tag, shp)) {
        base = ((s + 1) & rt->xmask) * MG_RT_XREC;
        if (!p_rec_is(xr, base, m, tag, shp)) return R_NONE;
    }
    /* the literal runs: before the first parameter, between, after */
    uint32_t pack = (uint32_t)xr[base + X_P_PACK];
    int32_t l0 = (int32_t)((pack >> 8) & 0xfff), l1 = (int32_t)(pack >> 20);
    int32_t l2 = xr[base + X_LEN] - l0 - l1;
    if (bi[p1] != l0 || b1 - a1 != l1 || len - a2 != l2) return R_NONE;
    const uint8_t *lits = rt->xp_inline ? (const uint8_t *)xr + base * 4 + X_P_INLINE_AT
                                        : rt->labels + xr[base + X_P_OFF];
    const char *path = w->path;
    if (memcmp(path, lits, (size_t)l0) != 0 || memcmp(path + a1, lits + l0, (size_t)l1) != 0 ||
        (l2 > 0 && memcmp(path + a2, lits + l0 + l1, (size_t)l2) != 0))
        return R_NONE;
    return xr[base + X_HEAD] != 0 ? base : R_NONE;
}

/* the parameter shapes (one a byte) of the records of root for paths of
 * n segments, or 0 */
static uint32_t shapes_of(const mg_router_t *rt, int32_t root, int32_t n)
{
    if (n > X_SEGS_MAX || rt->nodes[root * MG_RT_NODE + MG_RT_N_XSHAPED] == 0 || !rt->xshp)
        return 0;
    uint32_t s = ((uint32_t)root * 2654435761u ^ (uint32_t)n) & (uint32_t)rt->xshp_mask;
    for (;;) {
        const int32_t *t = rt->xshp + 3 * s;
        if (t[0] == 0) return 0;
        if (t[0] == root && t[1] == n) return (uint32_t)t[2];
        s = (s + 1) & (uint32_t)rt->xshp_mask;
    }
}

/* Reads the path: bnd_i[k] the offset of its k-th "/" (bnd_i[1] = 0) and
 * past the last one its length, bnd_g[k] the key of the bytes before
 * bnd_i[k], seg_h[k] the hash of the segment after the k-th "/". A path
 * not starting with "/" has no segment (nb = 0). */
static void scan(mg_route_walk_t *w)
{
    const char *p = w->path;
    int32_t len = w->path_len, nb = 0;
    if (len > 0 && p[0] == SLASH) {
        uint32_t mult = (uint32_t)w->rt->mult, g = 0, sh = 0;
        nb = 1;
        w->bnd_i[1] = 0;
        w->bnd_g[1] = 0;
        for (int32_t j = 1; j < len; j++) {
            char c = p[j];
            if (c == SLASH) {
                w->seg_h[nb] = (int32_t)sh;
                g = g * GMULT + sh + 1u;
                nb++;
                w->bnd_i[nb] = j;
                w->bnd_g[nb] = (int32_t)g;
                sh = 0;
            } else {
                sh = sh * mult + (uint32_t)(int32_t)c; /* a char as the C view reads it */
            }
        }
        w->seg_h[nb] = (int32_t)sh;
        nb++;
        w->bnd_i[nb] = len;
        w->bnd_g[nb] = (int32_t)(g * GMULT + sh + 1u);
    }
    w->nb = nb;
}

/* After the entry w->check failed its predicates: the rest of its chain.
 * Returns 1 when the next candidate needs a check too. */
static int chain_next(mg_route_walk_t *w)
{
    const mg_router_t *rt = w->rt;
    for (int32_t e = rt->next_entry[w->check]; e != 0; e = rt->next_entry[e]) {
        int32_t rp = rt->ranks[e];
        if (rp >= w->best_rank) return 0;
        if ((rp & 1) == 0) {
            w->best = e;
            w->best_rank = rp;
            w->best_end = w->cend;
            return 0;
        }
        w->check = e;
        w->crank = rp;
        return 1;
    }
    return 0;
}

/* the chain headed by e (rank code rp, beating the best), patterns ending
 * at offset end: its first entry without predicates wins, or the walk
 * stops at the first with predicates, to go on at at_ */
#define CONSIDER(e, rp, end, at_)                                                                  \
    do {                                                                                           \
        if (((rp)&1) == 0) {                                                                       \
            w->best = (e);                                                                         \
            w->best_rank = (rp);                                                                   \
            w->best_end = (end);                                                                   \
        } else {                                                                                   \
            w->check = (e);                                                                        \
            w->crank = (rp);                                                                       \
            w->cend = (end);                                                                       \
            w->at = (at_);                                                                         \
            return MG_ROUTE_CHECK;                                                                 \
        }                                                                                          \
    } while (0)

/* after a record's head was considered: 1 when it decides its trie (it
 * won, or could not beat the best so far, and nothing else of the trie can
 * beat it) */
static int rec_decides(const mg_route_walk_t *w)
{
    const int32_t *xr = w->rt->xrec;
    if (w->xcons && w->best != xr[w->xbase + X_HEAD]) return 0;
    return xr[w->xbase + X_BEAT] == 0;
}

/* The walk: from the start when w->at is AT_NONE, else on from where it
 * stopped, the stopping entry's predicates passed or not. */
static int walk(mg_route_walk_t *w, int passed)
{
    const mg_router_t *rt = w->rt;
    const int32_t *nodes = rt->nodes;
    int32_t base, rank, x, e, end;

    if (w->at != AT_NONE) {
        int at = w->at;
        w->at = AT_NONE;
        if (passed) {
            w->best = w->check;
            w->best_rank = w->crank;
            w->best_end = w->cend;
        } else if (chain_next(w)) {
            w->at = at;
            return MG_ROUTE_CHECK;
        }
        switch (at) {
        case AT_RECORD: goto record_done;
        case AT_NODE_PREFIX: goto node_prefix_done;
        default: goto next_branch; /* AT_NODE_EXACT */
        }
    }

    scan(w);
    w->best = 0;
    w->best_rank = INT32_MAX;
    w->best_end = 0;
    w->ri = 0;
    w->sp = 0;

next_root:
    if (w->ri >= w->nroots) return MG_ROUTE_DONE;
    w->k = w->roots[w->ri++];
    w->i = 0;
    w->d = 0;
    if (nodes[w->k * MG_RT_NODE + N_MIN] >= w->best_rank)
        goto next_root; /* nothing in this trie can win */
    if (!rt->xrec || w->nb == 0) goto node;

    /* the bucket's records: the path's exact record */
    x = look(w, w->k * 4 + X_EXACT, w->path_len, (uint32_t)w->bnd_g[w->nb]);
    if (x >= 0) {
        end = w->path_len;
        goto record;
    }
    if (x == R_WALK) goto node;
    /* else the parameter records of the path's segment count */
    w->shapes = (int32_t)shapes_of(rt, w->k, w->nb - 1);
    while (w->shapes != 0) {
        int32_t shp = w->shapes & 255;
        w->shapes = (int32_t)((uint32_t)w->shapes >> 8);
        x = param_look(w, w->k * 4 + X_PARAM, shp);
        if (x >= 0) {
            end = w->path_len;
            goto record;
        }
    }
    /* else its prefix records, the longest body first */
    w->kb = nodes[w->k * MG_RT_NODE + MG_RT_N_XDEPTH];
    if (w->kb == 0) goto node;
    if (w->kb > w->nb) w->kb = w->nb;
    for (;;) {
        x = look(w, w->k * 4 + X_PREFIX, w->bnd_i[w->kb], (uint32_t)w->bnd_g[w->kb]);
        if (x >= 0) {
            end = w->bnd_i[w->kb];
            goto record;
        }
        if (x == R_WALK || w->kb == 1) goto node;
        w->kb--;
    }

record:
    /* the record x found, whose patterns end at offset end: its head, then
     * whether it decides the bucket */
    w->xbase = x;
    w->xcons = 0;
    rank = rt->xrec[x + X_RANK];
    if (rank < w->best_rank) {
        w->xcons = 1;
        CONSIDER(rt->xrec[x + X_HEAD], rank, end, AT_RECORD);
    }
record_done:
    if (rec_decides(w)) goto next_branch;

node:
    /* at node w->k, offset w->i (the end of segment w->d) */
    base = w->k * MG_RT_NODE;
    if (nodes[base + N_MIN] >= w->best_rank) goto next_branch;
    e = nodes[base + N_PREFIX];
    if (e != 0 && nodes[base + N_PREFIX_RANK] < w->best_rank)
        CONSIDER(e, nodes[base + N_PREFIX_RANK], w->i, AT_NODE_PREFIX);
node_prefix_done:
    base = w->k * MG_RT_NODE;
    if (w->i < w->path_len) {
        int32_t i = w->i, d = w->d;
        if (w->path[i] != SLASH) goto next_branch; /* a path not starting with "/", at a root */
        /* the next segment, (i, j) exclusive, and the children */
        int32_t j = w->bnd_i[d + 2];
        uint32_t h = (uint32_t)w->seg_h[d + 1];
        int32_t child, pc = nodes[base + N_PARAM];
        d++;
        if (pc != 0 && j > i + 1) {
            int32_t *t = w->stk + 3 * w->sp++;
            t[0] = pc;
            t[1] = j;
            t[2] = d;
        }
        int32_t kmask = nodes[base + N_KMASK];
        if (kmask < 0) {
            child = nodes[base + N_KHASH] == (int32_t)h ? nodes[base + N_KID] : 0;
        } else {
            const int32_t *kt = rt->karr + nodes[base + N_KOFF];
            uint32_t ks = home(h, kmask);
            for (;;) {
                child = kt[2 * ks + 1];
                if (child == 0 || kt[2 * ks] == (int32_t)h) break;
                ks = (ks + 1) & (uint32_t)kmask;
            }
        }
        if (child != 0) {
            /* the hash may be another segment's: compare the bytes */
            int32_t cbase = child * MG_RT_NODE, n = nodes[cbase + N_LEN];
            if (n == j - i - 1) {
                const uint8_t *seg = n <= N_INLINE_MAX
                                         ? (const uint8_t *)nodes + cbase * 4 + N_INLINE_AT
                                         : rt->labels + nodes[cbase + N_OFF];
                if (n == 0 || memcmp(w->path + i + 1, seg, (size_t)n) == 0) {
                    w->k = child;
                    w->i = j;
                    w->d = d;
                    goto node;
                }
            }
        }
    } else {
        e = nodes[base + N_EXACT];
        if (e != 0 && nodes[base + N_EXACT_RANK] < w->best_rank)
            CONSIDER(e, nodes[base + N_EXACT_RANK], w->i, AT_NODE_EXACT);
    }

next_branch:
    /* the last parameter child left, or the next bucket */
    if (w->sp > 0) {
        const int32_t *t = w->stk + 3 * --w->sp;
        w->k = t[0];
        w->i = t[1];
        w->d = t[2];
        goto node;
    }
    goto next_root;
}

/* Host buckets. A bucket is found by the hash of its name: forward
 * (h = h * HMULT + byte) for an exact host and a wildcard prefix
 * ("example."), over the bytes from the last for a wildcard suffix
 * (".example.com"), so that one pass each way gives the hash of every
 * suffix and prefix ending at a dot; the name is compared after. */
#define HMULT 1000003u
enum { HOST_EXACT = 0, HOST_SUFFIX = 1, HOST_PREFIX = 2 };
enum { WILD_SUFFIX = 1, WILD_PREFIX = 2 }; /* mg_router_t.wild */

static int32_t host_bucket(const mg_router_t *rt, uint32_t h, int32_t kind, const uint8_t *name,
                           int32_t len)
{
    uint32_t m = xmix(h, kind), s = m & (uint32_t)rt->hosts_mask;
    for (;;) {
        const int32_t *t = rt->hosts + 4 * s;
        if (t[2] == 0) return 0;
        if (t[0] == (int32_t)m && t[1] == len * 4 + kind &&
            memcmp(rt->host_bytes + t[3], name, (size_t)len) == 0)
            return t[2];
        s = (s + 1) & (uint32_t)rt->hosts_mask;
    }
}

static inline int len_in(const uint32_t *lens, int32_t len)
{
    return len > 255 || (lens[len >> 5] & (1u << (len & 31))) != 0;
}

/* The buckets of host into roots: its exact one first, then the
 * wildcards' of each dot but a first or last byte's (prefixes in the
 * forward pass that hashes the whole host, suffixes in a pass from the
 * last byte; each looked up only when some wildcard has that length; the
 * order of the others does not change the answer). Returns their count. */
static int32_t host_roots(const mg_router_t *rt, const uint8_t *h, int32_t n, int32_t *roots)
{
    int32_t count = 0, r, j;
    uint32_t f = 0;
    int pfx = (rt->wild & WILD_PREFIX) != 0;
    for (j = 0; j < n; j++) {
        f = f * HMULT + h[j];
        if (pfx && j >= 1 && j < n - 1 && h[j] == '.' && len_in(rt->pfx_lens, j + 1) &&
            (r = host_bucket(rt, f, HOST_PREFIX, h, j + 1)) != 0)
            roots[count++] = r;
    }
    if ((r = host_bucket(rt, f, HOST_EXACT, h, n)) != 0) {
        if (count > 0) roots[count] = roots[0];
        roots[0] = r;
        count++;
    }
    if (rt->wild & WILD_SUFFIX) {
        f = 0;
        for (j = n - 1; j >= 1; j--) {
            f = f * HMULT + h[j];
            if (j < n - 1 && h[j] == '.' && len_in(rt->sfx_lens, n - j) &&
                (r = host_bucket(rt, f, HOST_SUFFIX, h + j, n - j)) != 0)
                roots[count++] = r;
        }
    }
    return count;
}

int mg_route_find(mg_route_walk_t *w, const char *host, int32_t host_len)
{
    const mg_router_t *rt = w->rt;
    int32_t n = 0;
    if (host && host_len > 0 && rt->hosts_mask >= 0)
        n = host_roots(rt, (const uint8_t *)host, host_len, w->roots);
    if (rt->none != 0) w->roots[n++] = rt->none;
    w->nroots = n;
    w->at = AT_NONE; /* a walk left at a check (Lua raised) is dropped */
    return walk(w, 0);
}

int mg_route_resume(mg_route_walk_t *w, int passed)
{
    if (w->at == AT_NONE) return MG_ROUTE_DONE;
    return walk(w, passed);
}
