/* deadline.c: one timeout per connection on a uv timer that is moved only
 * when it must fire earlier.
 *
 * A proxied request used to stop and start its connections' timers about
 * eight times (header, send, keep-alive on the client side; read, idle on
 * the upstream one), each an O(log n) heap update in libuv. Here setting a
 * deadline is a store; the uv timer is re-armed only when the new deadline
 * comes before the time it is armed for. When it fires early (the deadline
 * moved later meanwhile) it re-arms itself for the rest: at most one extra
 * wake-up per timeout period per connection, and timeouts still fire at
 * exactly the loop time they would have fired at with uv_timer_start.
 */
#include "mg.h"

static void on_deadline_timer(uv_timer_t *t)
{
    mg_deadline_t *d = (mg_deadline_t *)t;
    uint64_t now = uv_now(t->loop);
    d->armed = 0;
    if (d->due == 0) return; /* cleared since it was armed */
    if (now < d->due) {      /* moved later since it was armed */
        d->armed = d->due;
        uv_timer_start(&d->timer, on_deadline_timer, d->due - now, 0);
        return;
    }
    d->due = 0;
    d->expired(d);
}

void mg__deadline_init(mg_deadline_t *d, uv_loop_t *loop, void *owner,
                       void (*expired)(mg_deadline_t *))
{
    uv_timer_init(loop, &d->timer);
    d->timer.data = owner;
    d->due = d->armed = 0;
    d->expired = expired;
}

void mg__deadline_set(mg_deadline_t *d, uint64_t ms)
{
    if (ms == 0) { /* no deadline: the armed timer, if any, fires for nothing */
        d->due = 0;
        return;
    }
    d->due = uv_now(d->timer.loop) + ms;
    if (d->armed && d->armed <= d->due) return; /* it fires in time and re-arms */
    d->armed = d->due;
    uv_timer_start(&d->timer, on_deadline_timer, ms, 0);
}
