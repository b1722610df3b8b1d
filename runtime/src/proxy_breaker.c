/* proxy_breaker.c: circuit breakers in the proxy path (the circuit-breaker
 * policy). The state machine is breaker.c's; this file decides which
 * target a request with a breaker goes to, and what its exchange reports.
 *
 * The breaker of a target is the breakers-zone entry of key
 * "<upstream id>/<host>:<port>": per upstream target and node-wide. Routes
 * whose policies name the same upstream share that state, each applying
 * its own thresholds when it reports.
 *
 *   pick   the balancer's target when its breaker admits; else the next
 *          targets of the upstream in order (weight > 0), the first that
 *          admits (an open target is skipped while others are healthy, as
 *          Envoy's outlier ejection and Kong's unhealthy targets are).
 *          None: 503 with Retry-After (the smallest wait of the refusals,
 *          rounded up to whole seconds) and the gateway's JSON error body;
 *          no connection is made.
 *   head   the response head: its status says success or failure; the
 *          call's duration (for slow_ms) is acquire to head, connect time
 *          included (what the client waits for, less the body).
 *   end    exactly one report per acquire, when the exchange ends:
 *            failure  a status of failure_statuses; a connect error; a
 *                     connect, send or read timeout; the backend closing
 *                     or resetting before the response ended; an invalid
 *                     response;
 *            success  the rest (once the response is complete, or the
 *                     client left after its head: the head decides);
 *            neither  the exchange was cut before the head by the client
 *                     or the gateway itself (a body error, a request head
 *                     too large): nothing is counted and a probe's slot
 *                     is given back. Except: a call that had already
 *                     lasted slow_ms is reported as a slow call (a backend
 *                     that hangs longer than clients wait is slow).
 *          A retry on a fresh connection after a pooled one turned out
 *          dead is the same call (one acquire, one report).
 *
 * Routes without a breaker pay one pointer test per request (r->brk) and
 * one per exchange end (r->brk_key). With one: one set lock per acquire
 * and per report, no allocation.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mg.h"
#include "shm.h"

mg_upstream_breaker_t *mg_upstream_breaker_new(mg_shm_zone_t *z, const mg_breaker_conf_t *conf,
                                               const int *failure_statuses, size_t n)
{
    if (z == NULL || conf == NULL || (failure_statuses == NULL && n > 0)) return NULL;
    if (!mg__breaker_conf_ok(conf) || !mg__breaker_zone_ok(z)) return NULL;
    mg_upstream_breaker_t *b = calloc(1, sizeof(*b));
    if (b == NULL) return NULL;
    for (size_t i = 0; i < n; i++) {
        int s = failure_statuses[i];
        if (s < 100 || s > 999) {
            free(b);
            return NULL;
        }
        b->failure[s / 8] |= (uint8_t)(1u << (s % 8));
    }
    b->refs = 1;
    b->zone = z;
    b->conf = *conf;
    return b;
}

void mg_upstream_breaker_release(mg_upstream_breaker_t *b)
{
    if (b && --b->refs == 0) free(b);
}

int mg_req_set_breaker(mg_req_t *r, mg_upstream_breaker_t *b)
{
    if (r == NULL) return MG_EINVAL;
    /* Only before a target is picked: an acquired breaker must be reported
     * with the conf it was acquired with. */
    if (r->brk_key != NULL) return MG_DECLINED;
    if (b) b->refs++;
    mg_upstream_breaker_release(r->brk);
    r->brk = b;
    return MG_OK;
}

static double elapsed_ms(const mg_req_t *r)
{
    return (double)(mg__now_ns() - r->brk_start_ns) / 1e6;
}

int mg__breaker_pick(mg_req_t *r, int first)
{
    mg_upstream_t *u = r->upstream;
    const mg_upstream_breaker_t *b = r->brk;
    mg_breaker_result_t res;
    double wait = -1;

    /* O(targets) acquires in the worst case (all refuse): one set lock each. */
    for (int k = 0; k < u->ntargets; k++) {
        int i = (first + k) % u->ntargets;
        if (k > 0 && u->targets[i].weight == 0) continue;
        int rc = mg_breaker_acquire(b->zone, u->targets[i].brk_key, u->targets[i].brk_key_len,
                                    &b->conf, 0, &res);
        if (rc < 0) {
            /* The state cannot be read (a lock that failed): the breaker
             * fails open, as a broken breaker must not stop traffic. */
            mg_log(MG_LOG_WARN, "circuit breaker %s: state unreadable (%d), not applied",
                   u->targets[i].brk_key, rc);
            return i;
        }
        if (res.allowed) {
            r->brk_key = u->targets[i].brk_key;
            r->brk_key_len = u->targets[i].brk_key_len;
            r->brk_probe = res.probe;
            r->brk_head = 0;
            r->brk_start_ns = mg__now_ns();
            return i;
        }
        if (wait < 0 || res.retry_after < wait) wait = res.retry_after;
    }
    char ra[24];
    double secs = ceil(wait);
    int n = snprintf(ra, sizeof(ra), "%.0f", secs < 1 ? 1.0 : secs);
    mg_resp_set_header(r, "Retry-After", 11, ra, (size_t)n, MG_HDR_SET);
    mg__req_fail(r, 503, "upstream circuit open");
    return -1;
}

void mg__breaker_head(mg_req_t *r, int status)
{
    const mg_upstream_breaker_t *b = r->brk;
    int failed = status >= 0 && status <= 999 && (b->failure[status / 8] >> (status % 8) & 1);
    r->brk_head_ms = elapsed_ms(r);
    r->brk_head = 1 + failed;
}

static void report(mg_req_t *r, int failed, double ms)
{
    const mg_upstream_breaker_t *b = r->brk;
    int rc = mg_breaker_report(b->zone, r->brk_key, r->brk_key_len, &b->conf, failed, ms,
                               r->brk_probe, 0);
    /* MG_EFULL: every entry of the key's set is pinned (held concurrency
     * slots): this outcome is lost, which only delays an opening. */
    if (rc < 0) mg_log_debug("circuit breaker %s: report failed (%d)", r->brk_key, rc);
}

void mg__breaker_end(mg_req_t *r, int failed)
{
    if (r->brk_key == NULL) return;
    const mg_upstream_breaker_t *b = r->brk;
    if (failed) {
        report(r, 1, r->brk_head ? r->brk_head_ms : elapsed_ms(r));
    } else if (r->brk_head) {
        report(r, r->brk_head == 2, r->brk_head_ms);
    } else {
        double ms = elapsed_ms(r);
        if (b->conf.slow_ms > 0 && ms >= (double)b->conf.slow_ms)
            report(r, 0, ms);
        else if (r->brk_probe)
            mg__breaker_release(b->zone, r->brk_key, r->brk_key_len, 0);
    }
    r->brk_key = NULL;
}

void mg__breaker_detach(mg_req_t *r)
{
    mg__breaker_end(r, 0);
    mg_upstream_breaker_release(r->brk);
    r->brk = NULL;
}
