/* out.c: gathered writes. Data is referenced, never copied: the caller
 * keeps it in place until the write completes (the pump waits for the
 * write callback before it reuses the buffer the views point into). */
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "mg.h"

static char crlf[] = "\r\n";
static char last_chunk[] = "0\r\n\r\n";

void mg__out_reset(mg_out_t *o)
{
    o->n = 0;
    o->nframes = 0;
    o->bytes = 0;
}

int mg__out_room(const mg_out_t *o)
{
    return MG_OUT_IOV - o->n;
}

void mg__out_add(mg_out_t *o, const char *p, size_t len)
{
    /* Callers check mg__out_room first; overflowing would drop bytes. */
    assert(o->n < MG_OUT_IOV);
    if (len == 0) return;
    /* Adjacent views of one buffer merge into one entry. */
    if (o->n > 0 && o->iov[o->n - 1].base + o->iov[o->n - 1].len == p) {
        o->iov[o->n - 1].len += len;
    } else {
        o->iov[o->n].base = (char *)p;
        o->iov[o->n].len = len;
        o->n++;
    }
    o->bytes += len;
}

void mg__out_add_chunk(mg_out_t *o, const char *p, size_t len)
{
    if (len == 0) return; /* a zero-size chunk would end the body */
    assert(o->n + 3 <= MG_OUT_IOV && o->nframes < MG_OUT_IOV / 2);
    char *f = o->frames[o->nframes++];
    int n = snprintf(f, sizeof(o->frames[0]), "%zx\r\n", len);
    mg__out_add(o, f, (size_t)n);
    mg__out_add(o, p, len);
    mg__out_add(o, crlf, 2);
}

void mg__out_add_last_chunk(mg_out_t *o)
{
    mg__out_add(o, last_chunk, 5);
}

int mg__out_flush(mg_out_t *o, uv_stream_t *s, uv_write_cb cb)
{
    assert(!o->pending); /* one write in flight per direction */
    if (o->n == 0) return 0;
    int r = uv_try_write(s, o->iov, (unsigned)o->n);
    if (r == UV_EAGAIN || r == UV_ENOSYS) r = 0;
    if (r < 0) return r;
    size_t done = (size_t)r;
    int i = 0;
    while (i < o->n && done >= o->iov[i].len) {
        done -= o->iov[i].len;
        i++;
    }
    if (i == o->n) {
        mg__out_reset(o);
        return 0;
    }
    o->iov[i].base += done;
    o->iov[i].len -= done;
    r = uv_write(&o->wreq, s, o->iov + i, (unsigned)(o->n - i), cb);
    if (r < 0) return r;
    o->pending = 1;
    return 1;
}
