/* shm.c: shared-memory zones: creation, key hashing, set locks, lookup
 * and eviction. The layout and the rules are in shm.h. */
#include "shm.h"

#include <errno.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>

#include "log.h"
#include "mg.h"

#define SHM_MAGIC 0x6d6773686d7a6e31ULL /* "mgshmzn1" */
#define SHM_HEADER 256                  /* zone header, room to grow */
#define SHM_LIMITS_DEFAULT (16u << 20)
#define SHM_BREAKERS_DEFAULT (1u << 20)

_Static_assert(sizeof(mg_shm_set_t) == 64, "a set header is one cache line");
_Static_assert(sizeof(mg_shm_entry_t) == MG_SHM_ENTRY_HEAD, "entry header size");
_Static_assert(sizeof(struct mg_shm_zone_s) <= SHM_HEADER, "zone header size");

/* The zones of this process (inherited through fork from the master). */
static mg_shm_zone_t *shm_zones[MG_SHM_MAX_ZONES];
static int shm_nzones;
static int shm_created;
static int64_t shm_clock; /* mg_shm_set_clock's time, or 0 */

int mg_shm_set_clock(int64_t now_us)
{
    if (mg__worker != NULL || now_us < 0) return MG_EINVAL;
    shm_clock = now_us;
    return MG_OK;
}

int64_t mg__shm_now_us(void)
{
    struct timespec ts;

    /* uv_now: CLOCK_MONOTONIC(_COARSE) in ms, the same clock as below */
    if (mg__worker != NULL) return (int64_t)uv_now(mg__worker->loop) * 1000;
    if (shm_clock != 0) return shm_clock;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static inline mg_shm_set_t *shm_set(mg_shm_zone_t *z, uint32_t set)
{
    return (mg_shm_set_t *)((char *)z + SHM_HEADER + (size_t)set * z->set_stride);
}

mg_shm_entry_t *mg__shm_entry(mg_shm_zone_t *z, uint32_t slot)
{
    return (mg_shm_entry_t *)((char *)shm_set(z, slot / MG_SHM_WAYS) + sizeof(mg_shm_set_t) +
                              (size_t)(slot % MG_SHM_WAYS) * z->entry_size);
}

size_t mg__shm_value_size(const mg_shm_zone_t *z)
{
    return z->entry_size - MG_SHM_ENTRY_HEAD;
}

/* --- creation ----------------------------------------------------------- */

mg_shm_zone_t *mg__shm_zone_new(const char *name, size_t size)
{
    size_t len = strlen(name), esize, stride;
    pthread_mutexattr_t attr;
    mg_shm_zone_t *z;
    uint64_t nsets;
    uint32_t i;

    if (len == 0 || len >= MG_SHM_NAME_MAX || shm_nzones == MG_SHM_MAX_ZONES) return NULL;
    esize = strcmp(name, "limits") == 0 ? MG_SHM_ENTRY_SMALL : MG_SHM_ENTRY_LARGE;
    stride = sizeof(mg_shm_set_t) + MG_SHM_WAYS * esize;
    if (size < SHM_HEADER + stride) return NULL;
    nsets = (size - SHM_HEADER) / stride;
    if (nsets > UINT32_MAX / MG_SHM_WAYS) nsets = UINT32_MAX / MG_SHM_WAYS;

    z = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (z == MAP_FAILED) {
        mg_log(MG_LOG_ERROR, "shm zone %s: mmap of %zu bytes: %s", name, size, strerror(errno));
        return NULL;
    }
    z->magic = SHM_MAGIC;
    memcpy(z->name, name, len + 1);
    z->id = (uint32_t)shm_nzones;
    z->entry_size = (uint32_t)esize;
    z->nsets = (uint32_t)nsets;
    z->size = size;
    z->set_stride = stride;
    if (getrandom(&z->seed, sizeof(z->seed), 0) != sizeof(z->seed))
        z->seed = (uint64_t)mg__shm_now_us() * 0x9e3779b97f4a7c15ULL;

    /* Writing the set headers touches every page: the zone is resident
     * from the start (once, shared by all workers). */
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    for (i = 0; i < z->nsets; i++)
        pthread_mutex_init(&shm_set(z, i)->lock, &attr);
    pthread_mutexattr_destroy(&attr);

    shm_zones[shm_nzones++] = z;
    return z;
}

static int shm_new_logged(const char *name, uint64_t size)
{
    if (mg__shm_zone_new(name, (size_t)size) != NULL) return 0;
    mg_log(MG_LOG_ERROR, "shm zone %s (%llu bytes) could not be created", name,
           (unsigned long long)size);
    return -ENOMEM;
}

int mg__shm_create(const mg_node_conf_t *conf)
{
    uint64_t limits = SHM_LIMITS_DEFAULT, breakers = SHM_BREAKERS_DEFAULT;
    int i, r;

    if (shm_created) return 0;
    shm_created = 1;
    for (i = 0; conf != NULL && i < conf->nshm; i++) {
        if (strcmp(conf->shm[i].name, "limits") == 0) limits = conf->shm[i].size;
        if (strcmp(conf->shm[i].name, "breakers") == 0) breakers = conf->shm[i].size;
    }
    if ((r = shm_new_logged("limits", limits)) < 0) return r;
    if ((r = shm_new_logged("breakers", breakers)) < 0) return r;
    for (i = 0; conf != NULL && i < conf->nshm; i++) {
        const char *name = conf->shm[i].name;
        if (strcmp(name, "limits") == 0 || strcmp(name, "breakers") == 0) continue;
        if ((r = shm_new_logged(name, conf->shm[i].size)) < 0) return r;
    }
    return 0;
}

mg_shm_zone_t *mg_shm_zone(const char *name, size_t len)
{
    int i;

    if (!shm_created && mg__shm_create(NULL) < 0) return NULL;
    /* name comes from a policy's conf: a NUL inside it, or a length past
     * the stored names, matches nothing (and reads nothing beyond them) */
    if (name == NULL || len == 0 || len >= MG_SHM_NAME_MAX || memchr(name, '\0', len)) return NULL;
    for (i = 0; i < shm_nzones; i++) {
        if (memcmp(shm_zones[i]->name, name, len) == 0 && shm_zones[i]->name[len] == '\0')
            return shm_zones[i];
    }
    return NULL;
}

int mg_shm_stats(mg_shm_zone_t *z, uint64_t *used, uint64_t *capacity, uint64_t *evictions)
{
    if (z == NULL) return MG_EINVAL;
    if (used) *used = atomic_load_explicit(&z->used, memory_order_relaxed);
    if (capacity) *capacity = (uint64_t)z->nsets * MG_SHM_WAYS;
    if (evictions) *evictions = atomic_load_explicit(&z->evictions, memory_order_relaxed);
    return MG_OK;
}

/* --- keys ------------------------------------------------------------------- */

static inline uint64_t shm_mix(uint64_t a, uint64_t b)
{
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

/* A seeded multiply-mix hash (wyhash's core step): ~1 ns per 8 bytes. */
static uint64_t shm_hash(uint64_t seed, const char *p, size_t len)
{
    uint64_t h = seed ^ (len * 0xa0761d6478bd642fULL), w;

    for (; len >= 8; p += 8, len -= 8) {
        memcpy(&w, p, 8);
        h = shm_mix(h ^ w, 0xe7037ed1a0b428dbULL);
    }
    /* the last 0..7 bytes, without a variable-length memcpy call */
    w = 0;
    if (len >= 4) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + len - 4, 4);
        w = (uint64_t)a << 32 | b;
    } else if (len > 0) {
        w = (uint64_t)(unsigned char)p[0] << 16 | (uint64_t)(unsigned char)p[len / 2] << 8 |
            (unsigned char)p[len - 1];
    }
    h = shm_mix(h ^ w, 0x8ebc6af09c88c6e3ULL);
    return shm_mix(h, 0x589965cc75374cc3ULL);
}

void mg__shm_key(const mg_shm_zone_t *z, const char *key, size_t len, int kind, mg_shm_key_t *k)
{
    k->hash = shm_hash(z->seed ^ (uint64_t)kind, key, len);
    /* fastrange: the high half of hash * nsets, no division */
    k->set = (uint32_t)(((__uint128_t)(k->hash & 0xffffffffffffULL) * z->nsets) >> 48);
    k->tag = (uint16_t)(k->hash >> 48);
    if (k->tag == 0) k->tag = 1; /* 0 marks a free way */
    k->kind = (uint8_t)kind;
    if (len <= MG_SHM_KEY_MAX) {
        k->len = (uint8_t)len;
        k->bytes = key;
    } else {
        /* ~0.5 us per key over 64 bytes: the price of never confusing two */
        k->len = MG_SHM_HASHED;
        SHA256((const unsigned char *)key, len, (unsigned char *)k->digest);
        k->bytes = k->digest;
    }
}

static inline size_t shm_stored_len(uint8_t len)
{
    return len == MG_SHM_HASHED ? SHA256_DIGEST_LENGTH : len;
}

/* --- locks ------------------------------------------------------------------- */

/* The holder died mid-update. Ways whose header cannot be right are freed;
 * the rest keep their state (see shm.h). */
static void shm_repair(mg_shm_zone_t *z, uint32_t set)
{
    mg_shm_set_t *s = shm_set(z, set);
    int i;

    for (i = 0; i < MG_SHM_WAYS; i++) {
        mg_shm_entry_t *e = mg__shm_entry(z, set * MG_SHM_WAYS + (uint32_t)i);
        if (atomic_load(&s->tag[i]) == 0) continue;
        if (e->kind == MG_SHM_FREE || e->kind >= MG_SHM_NKINDS ||
            (e->key_len > MG_SHM_KEY_MAX && e->key_len != MG_SHM_HASHED)) {
            atomic_store(&s->tag[i], 0);
            atomic_fetch_sub(&z->used, 1);
        }
    }
}

int mg__shm_lock(mg_shm_zone_t *z, uint32_t set)
{
    mg_shm_set_t *s = shm_set(z, set);
    int r;

    do {
        r = pthread_mutex_lock(&s->lock);
    } while (r == EINTR); /* not returned by glibc, but harmless */
    if (r == EOWNERDEAD) {
        shm_repair(z, set);
        pthread_mutex_consistent(&s->lock);
        atomic_fetch_add(&z->recovered, 1);
        return 0;
    }
    return -r;
}

void mg__shm_unlock(mg_shm_zone_t *z, uint32_t set)
{
    pthread_mutex_unlock(&shm_set(z, set)->lock);
}

/* --- lookup ---------------------------------------------------------------- */

static int shm_kept(const mg_shm_entry_t *e, mg_shm_entry_t *const *keep, int nkeep)
{
    for (int i = 0; i < nkeep; i++) {
        if (keep[i] == e) return 1;
    }
    return 0;
}

/* A hit reads the set's tag line and the matching entry only; a miss that
 * creates looks at the other entries (expiry, last use) to pick a way. */
mg_shm_entry_t *mg__shm_get(mg_shm_zone_t *z, const mg_shm_key_t *k, int create, int64_t now_us,
                            mg_shm_entry_t *const *keep, int nkeep, uint32_t *slot, int *err)
{
    mg_shm_set_t *s = shm_set(z, k->set);
    uint32_t base = k->set * MG_SHM_WAYS;
    int i, free_way = -1, expired = -1, lru = -1;
    int64_t lru_us = INT64_MAX;
    size_t klen = shm_stored_len(k->len);
    mg_shm_entry_t *e;

    for (i = 0; i < MG_SHM_WAYS; i++) {
        if (atomic_load_explicit(&s->tag[i], memory_order_relaxed) != k->tag) continue;
        e = mg__shm_entry(z, base + (uint32_t)i);
        if (e->kind == k->kind && e->key_len == k->len && memcmp(e->key, k->bytes, klen) == 0) {
            e->last_us = now_us;
            *slot = base + (uint32_t)i;
            return e;
        }
    }
    if (!create) {
        *err = MG_DECLINED;
        return NULL;
    }
    for (i = 0; i < MG_SHM_WAYS; i++) {
        if (atomic_load_explicit(&s->tag[i], memory_order_relaxed) == 0) {
            free_way = i;
            break;
        }
        e = mg__shm_entry(z, base + (uint32_t)i);
        if (shm_kept(e, keep, nkeep)) continue;
        if (e->expires_us <= now_us) {
            if (expired < 0) expired = i;
        } else if (e->expires_us != MG_SHM_PINNED && e->last_us < lru_us) {
            lru_us = e->last_us;
            lru = i;
        }
    }
    if (free_way >= 0) {
        i = free_way;
        atomic_fetch_add_explicit(&z->used, 1, memory_order_relaxed);
    } else if (expired >= 0) {
        i = expired;
    } else if (lru >= 0) {
        i = lru;
        atomic_fetch_add_explicit(&z->evictions, 1, memory_order_relaxed);
    } else {
        *err = MG_EFULL;
        return NULL;
    }
    /* Free the way first and publish the tag last, so a holder killed in
     * between leaves a free way, not a half-written key. */
    atomic_store_explicit(&s->tag[i], 0, memory_order_relaxed);
    e = mg__shm_entry(z, base + (uint32_t)i);
    memset(e->value, 0, mg__shm_value_size(z));
    memcpy(e->key, k->bytes, klen);
    e->key_len = k->len;
    e->kind = k->kind;
    e->last_us = now_us;
    e->expires_us = now_us;
    atomic_store_explicit(&s->tag[i], k->tag, memory_order_release);
    *slot = base + (uint32_t)i;
    return e;
}
