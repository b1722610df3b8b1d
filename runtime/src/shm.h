/* shm.h: shared-memory zones, the internal side (shm.c).
 *
 * A zone is one MAP_SHARED|MAP_ANONYMOUS mapping made by the master before
 * it forks, so every worker (and a respawned one) sees it at the same
 * address. Layout:
 *
 *   [zone header, 256 B][set 0][set 1]...   set = [header, 64 B][8 entries]
 *
 * A set's header and entries are adjacent: a lookup touches one page.
 * The table is set-associative: a key hashes (seeded, so clients cannot aim
 * keys at one set) to one set of MG_SHM_WAYS entries, guarded by that set's
 * robust process-shared mutex; there is no zone-wide lock. A set header
 * holds the mutex and a 16-bit tag per way (0 = free), so a lookup reads one
 * cache line, then compares the full key only where a tag matches.
 *
 * Keys: up to MG_SHM_KEY_MAX bytes are stored whole; a longer key is stored
 * as its SHA-256 (32 bytes, flagged), so two live keys never share an entry
 * (a SHA-256 collision is not a practical event, and no client can aim for
 * one). The entry kind (limit algorithm, breaker) is part of the identity.
 *
 * Eviction, when a key's set has no free way: an expired entry (its state
 * equals a fresh one: a full bucket, a past window, a closed breaker with
 * an empty window) is reused silently; otherwise the least recently used
 * entry of the set that is not pinned (a held concurrency slot) is evicted
 * and counted. This is an LRU sampled over the 8 entries of a set, as Redis
 * samples; a set full of pinned entries makes the call fail with MG_EFULL.
 *
 * A process killed while holding a set lock: the next locker gets
 * EOWNERDEAD, checks the set (shm_repair: entries whose header does not
 * make sense are freed; the others keep their state, each field of which is
 * an aligned 8-byte word, so at worst one take of the dead process is
 * half-applied) and marks the mutex consistent.
 */
#ifndef MG_SHM_H
#define MG_SHM_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "moongate.h"
#include "node.h"

#define MG_SHM_WAYS 8
#define MG_SHM_KEY_MAX 64
#define MG_SHM_HASHED 0xff /* key_len of a key stored as its SHA-256 */
#define MG_SHM_PINNED INT64_MAX

/* entry kinds (part of a key's identity) */
enum {
    MG_SHM_FREE = 0,
    MG_SHM_TOKEN_BUCKET = MG_LIMIT_TOKEN_BUCKET,
    MG_SHM_FIXED_WINDOW = MG_LIMIT_FIXED_WINDOW,
    MG_SHM_SLIDING_WINDOW = MG_LIMIT_SLIDING_WINDOW,
    MG_SHM_CONCURRENCY = 4,
    MG_SHM_BREAKER = 5,
    MG_SHM_NKINDS
};

/* Entry sizes: "limits" holds 128-byte entries (40 bytes of state), every
 * other zone 256-byte ones (168 bytes: enough for a breaker's window). */
#define MG_SHM_ENTRY_SMALL 128
#define MG_SHM_ENTRY_LARGE 256
#define MG_SHM_ENTRY_HEAD 88

typedef struct mg_shm_set_s {
    pthread_mutex_t lock; /* robust, process-shared */
    _Atomic uint16_t tag[MG_SHM_WAYS];
} __attribute__((aligned(64))) mg_shm_set_t;

typedef struct mg_shm_entry_s {
    int64_t last_us;    /* last use: LRU */
    int64_t expires_us; /* state equals a fresh one from then on; MG_SHM_PINNED never */
    uint8_t key_len;    /* <= MG_SHM_KEY_MAX, or MG_SHM_HASHED */
    uint8_t kind;       /* MG_SHM_* */
    uint8_t pad[6];
    char key[MG_SHM_KEY_MAX];
    _Alignas(8) unsigned char value[]; /* entry_size - MG_SHM_ENTRY_HEAD bytes */
} mg_shm_entry_t;

struct mg_shm_zone_s {
    uint64_t magic;
    char name[MG_SHM_NAME_MAX];
    uint32_t id; /* creation order: the lock order across zones */
    uint32_t entry_size;
    uint32_t nsets;
    uint32_t pad;
    uint64_t seed;       /* of the set hash */
    uint64_t size;       /* of the mapping */
    uint64_t set_stride; /* 64 + 8 x entry_size */
    _Atomic uint64_t used;
    _Atomic uint64_t evictions;
    _Atomic uint64_t recovered; /* locks taken over from a dead holder */
};

/* A key prepared for one zone: hash, tag and the stored form (the caller's
 * bytes, or the digest of a long key). Valid while the caller's key is. */
typedef struct mg_shm_key_s {
    uint64_t hash;
    uint32_t set;
    uint16_t tag;
    uint8_t len; /* as stored: <= MG_SHM_KEY_MAX or MG_SHM_HASHED */
    uint8_t kind;
    const char *bytes;
    char digest[32];
} mg_shm_key_t;

/* Creates the built-in zones (limits 16 MiB, breakers 1 MiB) and those of
 * conf->shm (a zone named like a built-in one resizes it). Once per
 * process; the master calls it before forking, `moongate mock` before its
 * workers, and mg_shm_zone calls it (conf NULL: defaults) when nothing did.
 * 0, or -errno with the reason logged. */
int mg__shm_create(const mg_node_conf_t *conf);
/* One more zone (C tests: small zones). NULL on failure. */
mg_shm_zone_t *mg__shm_zone_new(const char *name, size_t size);

void mg__shm_key(const mg_shm_zone_t *z, const char *key, size_t len, int kind, mg_shm_key_t *k);
/* Locks set k->set; 0 or -errno. */
int mg__shm_lock(mg_shm_zone_t *z, uint32_t set);
void mg__shm_unlock(mg_shm_zone_t *z, uint32_t set);

/* With the set locked: the entry of k, created (value zeroed: the fresh
 * state) when absent and create is set. *slot: its index in the zone.
 * keep/nkeep: entries of the same set this caller holds, never evicted.
 * NULL with *err MG_DECLINED (absent, !create) or MG_EFULL. */
mg_shm_entry_t *mg__shm_get(mg_shm_zone_t *z, const mg_shm_key_t *k, int create, int64_t now_us,
                            mg_shm_entry_t *const *keep, int nkeep, uint32_t *slot, int *err);
mg_shm_entry_t *mg__shm_entry(mg_shm_zone_t *z, uint32_t slot);
size_t mg__shm_value_size(const mg_shm_zone_t *z);

/* CLOCK_MONOTONIC in microseconds: in a worker, its loop's time (updated
 * once per loop turn, 1 ms resolution: free, where a clock read costs 50 to
 * 150 ns on some VMs); elsewhere the clock itself. */
int64_t mg__shm_now_us(void);

/* Breakers (breaker.c). conf_ok: the conf is one acquire/report take;
 * zone_ok: the zone's entries hold a breaker. release: a probe's call
 * ended with no verdict (the client left first): its slot goes back and
 * nothing is counted. */
int mg__breaker_conf_ok(const mg_breaker_conf_t *c);
int mg__breaker_zone_ok(mg_shm_zone_t *z);
int mg__breaker_release(mg_shm_zone_t *z, const char *key, size_t key_len, int64_t now_us);

/* The request's concurrency slots go back (req.c, when a request ends). */
void mg__limit_conc_release(mg_req_t *r);

#endif
