/* test_util.c: mg__grow, the one "double the buffer until it fits": the
 * first size, doubling, the cut to max, a request over max or over
 * SIZE_MAX (the buffer is kept as it was), a first size above max, a
 * request that already fits (no realloc, even over a larger old cap), and
 * the bytes surviving a move. */
#include <stdint.h>
#include <stdlib.h>

#include "check.h"
#include "mg.h"

/* Under ASan an impossible allocation aborts the test unless the allocator
 * returns NULL as glibc's does; ASAN_OPTIONS from make asan still apply. */
__attribute__((used)) const char *__asan_default_options(void)
{
    return "allocator_may_return_null=1";
}

static void test_first_and_doubling(void)
{
    char *b = NULL;
    size_t cap = 0;

    CHECK(mg__grow(&b, &cap, 0, 0, 1024, 1 << 20) == 0); /* nothing asked: nothing allocated */
    CHECK(b == NULL && cap == 0);
    CHECK(mg__grow(&b, &cap, 0, 10, 1024, 1 << 20) == 0);
    CHECK(b != NULL && cap == 1024);
    if (b == NULL) return;
    memcpy(b, "0123456789", 10);
    CHECK(mg__grow(&b, &cap, 10, 1014, 1024, 1 << 20) == 0); /* exactly full: no growth */
    CHECK(cap == 1024);
    CHECK(mg__grow(&b, &cap, 1024, 1, 1024, 1 << 20) == 0); /* one more byte: doubles */
    CHECK(cap == 2048);
    CHECK(mg__grow(&b, &cap, 1024, 5000, 1024, 1 << 20) == 0); /* doubles until it fits */
    CHECK(cap == 8192);
    CHECK_MEM(b, 10, "0123456789"); /* the bytes moved with the buffer */
    free(b);

    b = NULL;
    cap = 0;
    CHECK(mg__grow(&b, &cap, 0, 5000, 1024, 1 << 20) == 0); /* the first size doubles too */
    CHECK(cap == 8192);
    free(b);

    b = NULL;
    cap = 0;
    CHECK(mg__grow(&b, &cap, 0, 7, 0, 1 << 20) == 0); /* no first size: exactly what is asked */
    CHECK(cap == 7);
    free(b);
}

static void test_max(void)
{
    char *b = NULL, *old;
    size_t cap = 0;

    /* the doubling step is cut to max */
    CHECK(mg__grow(&b, &cap, 0, 600, 512, 1000) == 0);
    CHECK(cap == 1000);
    old = b;
    /* one byte over max: refused, the buffer and cap are untouched */
    CHECK(mg__grow(&b, &cap, 600, 401, 512, 1000) == UV_E2BIG);
    CHECK(b == old && cap == 1000);
    CHECK(mg__grow(&b, &cap, 600, 400, 512, 1000) == 0); /* exactly max */
    /* used + more over max although the old cap would hold it (a buffer
     * kept from a call with a larger max, as etcd.c's error bodies) */
    CHECK(mg__grow(&b, &cap, 600, 300, 512, 800) == UV_E2BIG);
    free(b);

    /* a first size above max starts at max */
    b = NULL;
    cap = 0;
    CHECK(mg__grow(&b, &cap, 0, 10, 4096, 100) == 0);
    CHECK(cap == 100);
    free(b);

    /* a max that is no power-of-two multiple of first: doubling stops at it */
    b = NULL;
    cap = 0;
    CHECK(mg__grow(&b, &cap, 0, 70000, 65536, 65536 * 3) == 0);
    CHECK(cap == 131072);
    CHECK(mg__grow(&b, &cap, 70000, 100000, 65536, 65536 * 3) == 0);
    CHECK(cap == 65536 * 3);
    free(b);
}

static void test_overflow(void)
{
    char *b = NULL;
    size_t cap = 0;

    CHECK(mg__grow(&b, &cap, 0, 100, 64, SIZE_MAX) == 0);
    CHECK(cap == 128);
    /* used + more wraps around size_t: refused, not a tiny buffer */
    CHECK(mg__grow(&b, &cap, 100, SIZE_MAX - 50, 64, SIZE_MAX) == UV_E2BIG);
    CHECK(mg__grow(&b, &cap, 100, SIZE_MAX, 64, SIZE_MAX) == UV_E2BIG);
    CHECK(cap == 128);
    /* fits in size_t but not in memory: ENOMEM, the buffer is kept */
    CHECK(mg__grow(&b, &cap, 100, SIZE_MAX / 2, 64, SIZE_MAX) == UV_ENOMEM);
    CHECK(b != NULL && cap == 128);
    if (b == NULL) return;
    memset(b, 'x', 128); /* still ours, still 128 bytes */
    free(b);
}

int main(void)
{
    test_first_and_doubling();
    test_max();
    test_overflow();
    return check_report();
}
