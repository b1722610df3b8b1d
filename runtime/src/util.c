/* util.c: small FFI utilities (log, sha256, base64) and the access log. */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "mg.h"

/* Makes room for more bytes after the used ones in *buf (*cap bytes), the
 * one growth rule of the runtime's byte buffers:
 * the capacity starts at first (when *cap is 0) and doubles until
 * used + more fits, and never passes max (the last step is cut to max).
 * 0: done (*buf may have moved; *cap is the new capacity). UV_E2BIG:
 * used + more is over max (or over SIZE_MAX); UV_ENOMEM: realloc failed.
 * On an error *buf and *cap are untouched, so the caller still owns and
 * frees the old buffer. Cost: a realloc per doubling, so appending n bytes
 * copies O(n) bytes in all. used <= *cap <= max is the caller's to keep. */
int mg__grow(char **buf, size_t *cap, size_t used, size_t more, size_t first, size_t max)
{
    size_t c = *cap, need;
    char *b;

    assert(used <= c); /* catches a caller that lost track of its length */
    /* max bounds the length, checked first: a buffer kept from a call with
     * a larger max may hold more than this call allows */
    if (used > max || more > max - used) return UV_E2BIG; /* also the size_t overflow */
    if (more <= c - used) return 0;
    need = used + more;
    if (c == 0) c = first ? first : need;
    while (c < need)
        c = c > max / 2 ? max : c * 2; /* max / 2: c * 2 can neither overflow nor pass max */
    if (c > max) c = max;              /* a first above max */
    b = realloc(*buf, c);
    if (b == NULL) return UV_ENOMEM;
    *buf = b;
    *cap = c;
    return 0;
}

/* The fields of /proc/<pid>/stat after the comm ("1234 (name) S 1 ...":
 * from the state letter on) into buf; NULL when it cannot be read. The
 * comm may hold spaces and parentheses, so it ends at the last ')'. One
 * read of at most size - 1 bytes: the fields a caller wants (state, ppid)
 * come first. */
const char *mg__proc_stat(pid_t pid, char *buf, size_t size)
{
    char path[64], *p;
    ssize_t n;
    int fd;

    snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    do {
        n = read(fd, buf, size - 1);
    } while (n < 0 && errno == EINTR);
    close(fd);
    if (n <= 0) return NULL;
    buf[n] = '\0';
    p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ' || p[2] == '\0') return NULL;
    return p + 2;
}

void mg_log_write(int level, const char *msg, size_t len)
{
    if (level < mg_log_level) return;
    mg_log(level, "%.*s", (int)len, msg);
}

int mg_base64_decode(const char *in, size_t len, unsigned char *out, size_t *out_len)
{
    size_t pad = 0;
    int n;

    *out_len = 0;
    if (len == 0) return MG_OK;
    /* EVP_DecodeBlock takes an int and skips leading and trailing white
     * space, which etcd never sends: refuse it rather than guess */
    if (len % 4 != 0 || len > (size_t)0x7ffffff0) return MG_EINVAL;
    if (in[len - 1] == '=') pad = in[len - 2] == '=' ? 2 : 1;
    /* EVP_DecodeBlock takes '=' anywhere as a zero digit ("====", "AB=C"
     * decode): padding is only the last one or two characters */
    if (memchr(in, '=', len - pad) != NULL) return MG_EINVAL;
    n = EVP_DecodeBlock(out, (const unsigned char *)in, (int)len);
    if (n < 0 || (size_t)n < pad) return MG_EINVAL;
    *out_len = (size_t)n - pad; /* it counts the padding as zero bytes */
    return MG_OK;
}

struct mg_sha256_s {
    EVP_MD_CTX *ctx;
};

mg_sha256_t *mg_sha256_new(void)
{
    mg_sha256_t *s = malloc(sizeof(*s));
    if (!s) return NULL;
    s->ctx = EVP_MD_CTX_new();
    if (!s->ctx || EVP_DigestInit_ex(s->ctx, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(s->ctx);
        free(s);
        return NULL;
    }
    return s;
}

int mg_sha256_update(mg_sha256_t *s, const char *data, size_t len)
{
    return EVP_DigestUpdate(s->ctx, data, len) == 1 ? MG_OK : MG_ERROR;
}

int mg_sha256_final(mg_sha256_t *s, unsigned char *out32)
{
    unsigned int n = 0;
    return EVP_DigestFinal_ex(s->ctx, out32, &n) == 1 && n == 32 ? MG_OK : MG_ERROR;
}

void mg_sha256_free(mg_sha256_t *s)
{
    if (!s) return;
    EVP_MD_CTX_free(s->ctx);
    free(s);
}

int mg_sha1_hex(const char *data, size_t len, char *out40)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_Digest(data, len, md, &n, EVP_sha1(), NULL) != 1 || n != 20) return MG_ERROR;
    for (unsigned int i = 0; i < 20; i++) {
        out40[2 * i] = hex[md[i] >> 4];
        out40[2 * i + 1] = hex[md[i] & 15];
    }
    return MG_OK;
}

/* ---- access log -------------------------------------------------------------- */

static int access_fd = -2; /* -2: not opened yet; -1: off */

static int access_open(const mg_node_conf_t *conf)
{
    const char *p = conf->access_log;
    if (!p[0] || strcmp(p, "off") == 0) return -1;
    if (strcmp(p, "stdout") == 0) return 1;
    int fd = open(p, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) mg_log(MG_LOG_ERROR, "access log %s: cannot open", p);
    return fd;
}

/* One line per request, written with one write(2) (atomic below PIPE_BUF
 * for O_APPEND files): remote, time, request line, status, bytes, request
 * id, route, upstream and total milliseconds. */
void mg__access_log(mg_req_t *r)
{
    mg_worker_t *w = r->conn->w;
    if (access_fd == -2) access_fd = access_open(w->conf);
    if (access_fd < 0) return;
    char line[1024];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    char ts[32];
    strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%SZ", &tm);
    double total = (double)(mg__now_ns() - r->start_ns) / 1e6;
    int pl = r->v.path_len > 512 ? 512 : (int)r->v.path_len;
    int n = snprintf(
        line, sizeof(line),
        "%s - [%s] \"%.*s %.*s HTTP/1.%d\" %d %llu %.*s route=%.*s up_ms=%.3f ms=%.3f\n",
        r->v.remote_addr, ts, (int)r->v.method_len, r->v.method ? r->v.method : "", pl,
        r->v.path ? r->v.path : "", r->v.version_minor, r->v.status,
        (unsigned long long)r->resp_sent, (int)r->v.request_id_len, r->v.request_id,
        (int)r->route_id_len, r->route_id ? r->route_id : "-", (double)r->up_ns / 1e6, total);
    if (n > 0) {
        if (n > (int)sizeof(line)) n = (int)sizeof(line);
        ssize_t wr = write(access_fd, line, (size_t)n);
        (void)wr;
    }
}

/* ---- process title ------------------------------------------------------------ */

/* argv's strings lie end to end in the process's memory: the title is
 * written over them (what /proc/<pid>/cmdline shows), as nginx does,
 * without moving the environment that follows: a title longer than the
 * original command line is cut. */
static char *title_at;
static size_t title_room;

void mg_proc_title_init(int argc, char **argv)
{
    char *end;

    if (argc < 1 || argv[0] == NULL) return;
    end = argv[0] + strlen(argv[0]) + 1;
    for (int i = 1; i < argc && argv[i] == end; i++)
        end = argv[i] + strlen(argv[i]) + 1;
    title_at = argv[0];
    title_room = (size_t)(end - argv[0]);
}

void mg_proc_title_set(const char *title, const char *name)
{
    prctl(PR_SET_NAME, name, 0, 0, 0);
    if (title_at == NULL || title_room < 2) return;
    size_t n = strlen(title);
    if (n > title_room - 1) n = title_room - 1;
    memcpy(title_at, title, n);
    memset(title_at + n, 0, title_room - n);
}
