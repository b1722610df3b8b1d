/* test_etcd.c: the etcd driver (etcd.c) against a real etcd (Debian's
 * etcd-server) on free loopback ports, with a C sink that reads just what
 * it needs with strstr. Covers: range then watch, one TCP connection,
 * events as they come, failover from a dead endpoint, etcd killed and
 * restarted (LOST once, BACK, writes after the restart seen), a compacted
 * revision (RERANGE: a second range), auth (token, then re-authentication
 * after etcd restarts), rerange on demand. Skipped (counted as passed
 * nothing) when etcd is not installed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "sysutil.h"
#include "etcd.h"

static uv_loop_t loop;
static char dir[256], url[64], peer[64];
static pid_t etcd_pid;
static int client_port, dead_port;

/* ---- the etcd server -------------------------------------------------------- */

static int ctl(const char *args)
{
    return sh("etcdctl --endpoints %s --dial-timeout 2s %s >/dev/null 2>&1", url, args);
}

static int etcd_launch(int existing)
{
    etcd_pid = fork();
    if (etcd_pid == 0) {
        char data[300], log[300];
        snprintf(data, sizeof(data), "%s/data", dir);
        snprintf(log, sizeof(log), "%s/etcd.log", dir);
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        char init[128];
        snprintf(init, sizeof(init), "t=%s", peer);
        execlp("etcd", "etcd", "--name", "t", "--data-dir", data, "--listen-client-urls", url,
               "--advertise-client-urls", url, "--listen-peer-urls", peer,
               "--initial-advertise-peer-urls", peer, "--initial-cluster", init,
               "--initial-cluster-state", existing ? "existing" : "new", "--log-level", "warn",
               (char *)NULL);
        _exit(127);
    }
    for (int i = 0; i < 150; i++) {
        /* with auth enabled, the health check needs the user */
        if (ctl("endpoint health") == 0 || ctl("--user root:pw endpoint health") == 0) return 0;
        usleep(50000);
    }
    return -1;
}

static void etcd_kill(void)
{
    if (etcd_pid > 0) {
        kill(etcd_pid, SIGKILL);
        waitpid(etcd_pid, NULL, 0);
        etcd_pid = 0;
    }
}

static int64_t revision(void)
{
    char cmd[256], out[4096];
    snprintf(cmd, sizeof(cmd), "etcdctl --endpoints %s endpoint status -w json 2>/dev/null", url);
    FILE *p = popen(cmd, "r");
    size_t n = p ? fread(out, 1, sizeof(out) - 1, p) : 0;
    if (p) pclose(p);
    out[n] = '\0';
    char *r = strstr(out, "\"revision\":");
    return r ? strtoll(r + 11, NULL, 10) : -1;
}

/* ---- the sink ---------------------------------------------------------------------- */

static struct {
    int auths, ranges, lost, back, start_timeouts;
    int64_t range_rev;
    int range_keys;
    int lie_once; /* answer the next range with revision 1 (a stale watch start) */
    char stream[1 << 16];
    size_t stream_len;
    int events;
    int64_t max_mod;
    int compacted;
    char last[512];
} s;

static int count(const char *hay, size_t n, const char *needle)
{
    int c = 0;
    const char *p = hay, *end = hay + n;
    while ((p = memmem(p, (size_t)(end - p), needle, strlen(needle))) != NULL) {
        c++;
        p += strlen(needle);
    }
    return c;
}

static int64_t sink(void *ud, int ev, const char *data, size_t len, char *tok, size_t cap,
                    size_t *tok_len)
{
    (void)ud;
    snprintf(s.last, sizeof(s.last), "%.*s", (int)(len < 500 ? len : 500), data);
    switch (ev) {
    case MG_ETCD_EV_AUTH: {
        const char *t = memmem(data, len, "\"token\":\"", 9);
        if (!t) return MG_ETCD_FAIL;
        t += 9;
        const char *q = memchr(t, '"', len - (size_t)(t - data));
        if (!q || (size_t)(q - t) > cap) return MG_ETCD_FAIL;
        memcpy(tok, t, (size_t)(q - t));
        *tok_len = (size_t)(q - t);
        s.auths++;
        return MG_ETCD_OK;
    }
    case MG_ETCD_EV_RANGE: {
        const char *r = memmem(data, len, "\"revision\":\"", 12);
        if (!r) return MG_ETCD_FAIL;
        s.ranges++;
        s.range_rev = strtoll(r + 12, NULL, 10);
        s.range_keys = count(data, len, "\"create_revision\"");
        s.stream_len = 0;
        if (s.lie_once) {
            s.lie_once = 0;
            return 1;
        }
        return s.range_rev;
    }
    case MG_ETCD_EV_WATCH: {
        if (s.stream_len + len < sizeof(s.stream)) {
            memcpy(s.stream + s.stream_len, data, len);
            s.stream_len += len;
        }
        s.events = count(s.stream, s.stream_len, "\"kv\":");
        const char *p = s.stream;
        while ((p = memmem(p, s.stream_len - (size_t)(p - s.stream), "\"mod_revision\":\"", 16))) {
            int64_t m = strtoll(p + 16, NULL, 10);
            if (m > s.max_mod) s.max_mod = m;
            p += 16;
        }
        if (memmem(data, len, "\"compact_revision\"", 18)) {
            s.compacted++;
            return MG_ETCD_RERANGE;
        }
        return s.max_mod > 0 ? s.max_mod : MG_ETCD_OK;
    }
    case MG_ETCD_EV_LOST: s.lost++; break;
    case MG_ETCD_EV_BACK: s.back++; break;
    case MG_ETCD_EV_START_TIMEOUT: s.start_timeouts++; break;
    }
    return MG_ETCD_OK;
}

static const mg_etcd_sink_t the_sink = {sink, NULL};

/* runs the loop until cond holds or ms passed; returns cond */
#define RUN_UNTIL(cond, ms)                                                                        \
    ({                                                                                             \
        uint64_t until_ = uv_hrtime() + (uint64_t)(ms)*1000000u;                                   \
        while (!(cond) && uv_hrtime() < until_)                                                    \
            uv_run(&loop, UV_RUN_NOWAIT), usleep(1000);                                            \
        (cond);                                                                                    \
    })

/* "/t/" and "/t0" in base64 */
#define KEY_B64 "L3Qv"
#define END_B64 "L3Qw"

/* runs the loop for ms */
static void spin(int ms)
{
    uint64_t until = uv_hrtime() + (uint64_t)ms * 1000000u;
    while (uv_hrtime() < until) {
        uv_run(&loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
}

static mg_etcd_t *start(const char *const *eps, int n, const char *auth, uint32_t timeout_ms)
{
    mg_etcd_opts_t o = {.endpoints = eps,
                        .nendpoints = n,
                        .key_b64 = KEY_B64,
                        .end_b64 = END_B64,
                        .auth_body = auth,
                        .timeout_ms = timeout_ms,
                        .backoff_min_ms = 20,
                        .backoff_max_ms = 200};
    memset(&s, 0, sizeof(s));
    return mg__etcd_start(&loop, &o, &the_sink);
}

static void stop(mg_etcd_t *e)
{
    mg__etcd_stop(e);
    spin(20); /* the handles close */
}

/* ---- tests ------------------------------------------------------------------------- */

static void test_refuses_other_schemes(void)
{
    const char *eps[] = {"ftp://127.0.0.1:2379"};
    CHECK(start(eps, 1, NULL, 1000) == NULL);
}

static void test_range_watch(void)
{
    const char *eps[] = {url};
    mg_etcd_stats_t st;
    ctl("put /t/a 1");
    ctl("put /t/b 2");
    ctl("put /other x");
    int64_t rev = revision();
    mg_etcd_t *e = start(eps, 1, NULL, 2000);
    CHECK(e != NULL);
    CHECK(RUN_UNTIL(s.ranges == 1, 3000));
    CHECK(s.range_rev == rev);
    CHECK(s.range_keys == 2);                 /* /other is outside the range */
    CHECK(RUN_UNTIL(s.stream_len > 0, 3000)); /* the watch's "created" */
    ctl("put /t/c 3");
    CHECK(RUN_UNTIL(s.events == 1, 3000));
    CHECK(s.max_mod == rev + 1);
    ctl("del /t/a");
    CHECK(RUN_UNTIL(s.events == 2, 3000));
    CHECK(memmem(s.stream, s.stream_len, "\"DELETE\"", 8) != NULL);
    mg__etcd_stats(e, &st);
    CHECK(st.connects == 1); /* the range's connection carries the watch */
    CHECK(st.up == 1 && st.watches == 1 && st.failures == 0);
    CHECK(s.lost == 0 && s.start_timeouts == 0);

    /* a rerange on demand: read again, watch again */
    mg__etcd_rerange(e);
    CHECK(RUN_UNTIL(s.ranges == 2, 3000));
    CHECK(s.range_keys == 2);
    stop(e);
}

static void test_failover(void)
{
    char dead[64];
    snprintf(dead, sizeof(dead), "http://127.0.0.1:%d", dead_port);
    const char *eps[] = {dead, url};
    mg_etcd_stats_t st;
    mg_etcd_t *e = start(eps, 2, NULL, 2000);
    CHECK(RUN_UNTIL(s.ranges == 1, 3000));
    mg__etcd_stats(e, &st);
    CHECK(st.endpoint == 1);
    CHECK(st.failures == 1);
    CHECK(s.lost == 0); /* a failure before the first success is not a loss */
    stop(e);
}

static void test_start_timeout(void)
{
    char dead[64];
    snprintf(dead, sizeof(dead), "http://127.0.0.1:%d", dead_port);
    const char *eps[] = {dead};
    mg_etcd_t *e = start(eps, 1, NULL, 200);
    CHECK(RUN_UNTIL(s.start_timeouts == 1, 2000));
    CHECK(strstr(s.last, "connection refused") != NULL);
    CHECK(s.ranges == 0);
    /* it goes on trying: several failures, one start timeout */
    spin(300);
    CHECK(s.start_timeouts == 1);
    stop(e);
}

static void test_kill_restart(void)
{
    const char *eps[] = {url};
    mg_etcd_t *e = start(eps, 1, NULL, 2000);
    CHECK(RUN_UNTIL(s.ranges == 1 && s.stream_len > 0, 3000));
    etcd_kill();
    CHECK(RUN_UNTIL(s.lost == 1, 3000));
    spin(300);          /* several reconnections fail meanwhile */
    CHECK(s.lost == 1); /* told once */
    CHECK(etcd_launch(1) == 0);
    ctl("put /t/after-restart 1");
    CHECK(RUN_UNTIL(memmem(s.stream, s.stream_len, "L3QvYWZ0ZXItcmVzdGFydA==", 24) != NULL, 5000));
    CHECK(s.back == 1);
    CHECK(s.ranges == 1); /* the watch resumed from the revision it had */
    stop(e);
}

static void test_compacted(void)
{
    const char *eps[] = {url};
    for (int i = 0; i < 5; i++)
        ctl("put /t/many x");
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "compact %" PRId64 " --physical", revision());
    ctl(cmd);
    mg_etcd_t *e;
    memset(&s, 0, sizeof(s));
    s.lie_once = 1; /* the watch starts at revision 2, long compacted */
    {
        mg_etcd_opts_t o = {.endpoints = eps,
                            .nendpoints = 1,
                            .key_b64 = KEY_B64,
                            .end_b64 = END_B64,
                            .timeout_ms = 2000,
                            .backoff_min_ms = 20,
                            .backoff_max_ms = 200};
        e = mg__etcd_start(&loop, &o, &the_sink);
    }
    CHECK(RUN_UNTIL(s.ranges == 2, 3000));
    CHECK(s.compacted == 1);
    CHECK(s.lost == 0);
    stop(e);
}

static void test_auth(void)
{
    const char *eps[] = {url};
    CHECK(ctl("user add root:pw") == 0);
    CHECK(ctl("auth enable") == 0);
    /* a wrong password: refused, retried, never a range */
    mg_etcd_t *e = start(eps, 1, "{\"name\":\"root\",\"password\":\"nope\"}", 2000);
    spin(300);
    CHECK(s.ranges == 0 && s.auths == 0);
    stop(e);
    e = start(eps, 1, "{\"name\":\"root\",\"password\":\"pw\"}", 2000);
    CHECK(RUN_UNTIL(s.ranges == 1 && s.stream_len > 0, 3000));
    CHECK(s.auths == 1);
    CHECK(s.range_keys >= 1);
    /* a restart drops the (simple) tokens: the driver authenticates again */
    etcd_kill();
    CHECK(etcd_launch(1) == 0);
    sh("etcdctl --endpoints %s --user root:pw put /t/authed 1 >/dev/null 2>&1", url);
    CHECK(RUN_UNTIL(memmem(s.stream, s.stream_len, "L3QvYXV0aGVk", 12) != NULL, 5000));
    CHECK(s.auths >= 2);
    stop(e);
    sh("etcdctl --endpoints %s --user root:pw auth disable >/dev/null 2>&1", url);
}

int main(void)
{
    if (system("command -v etcd >/dev/null 2>&1") != 0) {
        printf("etcd not installed: skipped\n");
        return check_report();
    }
    signal(SIGPIPE, SIG_IGN);
    uv_loop_init(&loop);
    snprintf(dir, sizeof(dir), "/tmp/mg-test-etcd.XXXXXX");
    if (!mkdtemp(dir)) return 1;
    client_port = free_port();
    snprintf(url, sizeof(url), "http://127.0.0.1:%d", client_port);
    snprintf(peer, sizeof(peer), "http://127.0.0.1:%d", free_port());
    dead_port = free_port();
    if (etcd_launch(0) != 0) {
        fprintf(stderr, "etcd did not start (see %s/etcd.log)\n", dir);
        return 1;
    }
    test_refuses_other_schemes();
    test_range_watch();
    test_failover();
    test_start_timeout();
    test_kill_restart();
    test_compacted();
    test_auth();
    etcd_kill();
    sh("rm -rf %s", dir);
    return check_report();
}
