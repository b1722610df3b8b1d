/* check.h: the C unit tests' tiny harness. Each test binary prints
 * "N passed, N failed" and exits 1 when anything failed. */
#ifndef MG_TEST_CHECK_H
#define MG_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

static int passed, failed;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (cond) {                                                                                \
            passed++;                                                                              \
        } else {                                                                                   \
            failed++;                                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

#define CHECK_MEM(got, got_len, want)                                                              \
    do {                                                                                           \
        size_t wl_ = strlen(want);                                                                 \
        if ((size_t)(got_len) == wl_ && memcmp((got), (want), wl_) == 0) {                         \
            passed++;                                                                              \
        } else {                                                                                   \
            failed++;                                                                              \
            fprintf(stderr, "%s:%d: got \"%.*s\", want \"%s\"\n", __FILE__, __LINE__,             \
                    (int)(got_len), (got), (want));                                                \
        }                                                                                          \
    } while (0)

static inline int check_report(void)
{
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}

#endif
