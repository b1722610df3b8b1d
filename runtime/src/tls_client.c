/* tls_client.c: client TLS on memory BIOs (see tls_client.h).
 *
 * Costs: a context reads its files once; a connection allocates an SSL
 * and two memory BIOs (a few KiB, plus OpenSSL's record buffers, released
 * while idle: SSL_MODE_RELEASE_BUFFERS) and a full handshake (one ECDHE
 * and a chain verification, ~1 ms of CPU on loopback), or an abbreviated
 * one when http_client.c resumes a session the server gave for that host.
 */
#include "tls_client.h"

#include <arpa/inet.h>
#include <errno.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

#define PATH_CAP 4096

/* ptr + len into a NUL-terminated path; -1 when it does not fit. */
static int path_of(char *out, const char *p, size_t n)
{
    if (n >= PATH_CAP || memchr(p, 0, n)) return -1;
    memcpy(out, p, n);
    out[n] = 0;
    return 0;
}

static const char *ssl_reason(void)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    return r ? r : "unknown error";
}

/* A file the context needs: readable, else why not (errno's words are
 * clearer than OpenSSL's "system lib"). */
static int readable(const char *what, const char *path, char *err, size_t errlen)
{
    if (access(path, R_OK) == 0) return 0;
    snprintf(err, errlen, "%s: cannot read %s: %s", what, path, strerror(errno));
    return -1;
}

SSL_CTX *mg__tls_ctx_new(const mg_tls_opts_t *o, char *err, size_t errlen)
{
    char ca[PATH_CAP], cert[PATH_CAP], key[PATH_CAP];
    SSL_CTX *ctx;

    if ((o->ca_len && path_of(ca, o->ca, o->ca_len)) ||
        (o->cert_len && path_of(cert, o->cert, o->cert_len)) ||
        (o->key_len && path_of(key, o->key, o->key_len))) {
        snprintf(err, errlen, "tls: a path is too long or holds a NUL byte");
        return NULL;
    }
    if ((o->cert_len == 0) != (o->key_len == 0)) {
        snprintf(err, errlen, "tls: cert and key go together (the client certificate for mTLS)");
        return NULL;
    }
    ERR_clear_error();
    ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        snprintf(err, errlen, "tls: cannot create a context: %s", ssl_reason());
        return NULL;
    }
    /* TLS 1.2 and 1.3 only; a renegotiation (1.2) is refused: it would
     * need the read and write paths to cooperate mid-exchange */
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_verify(ctx, o->verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    if (o->ca_len) {
        if (readable("tls.ca", ca, err, errlen)) goto fail;
        if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
            snprintf(err, errlen, "tls.ca: %s holds no usable CA certificate: %s", ca,
                     ssl_reason());
            goto fail;
        }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        snprintf(err, errlen, "tls: cannot load the system CA store: %s", ssl_reason());
        goto fail;
    }
    if (o->cert_len) {
        if (readable("tls.cert", cert, err, errlen) || readable("tls.key", key, err, errlen))
            goto fail;
        if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
            snprintf(err, errlen, "tls.cert: %s: not a PEM certificate: %s", cert, ssl_reason());
            goto fail;
        }
        if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
            if (strstr(ssl_reason(), "mismatch")) /* OpenSSL checks the pair as it loads */
                snprintf(err, errlen, "tls.key: %s does not match the certificate %s", key, cert);
            else
                snprintf(err, errlen, "tls.key: %s: not a PEM private key: %s", key, ssl_reason());
            goto fail;
        }
        if (SSL_CTX_check_private_key(ctx) != 1) {
            snprintf(err, errlen, "tls.key: %s does not match the certificate %s", key, cert);
            goto fail;
        }
    }
    if (!o->verify)
        mg_log(MG_LOG_WARN, "TLS: verify is false: server certificates and names are NOT "
                            "checked (anyone on the path can read and change the traffic)");
    ERR_clear_error();
    return ctx;
fail:
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
}

static int is_ip(const char *name)
{
    unsigned char b[16];
    return inet_pton(AF_INET, name, b) == 1 || inet_pton(AF_INET6, name, b) == 1;
}

int mg__tls_init(mg_tls_t *t, SSL_CTX *ctx, const char *name, char *err, size_t errlen)
{
    memset(t, 0, sizeof(*t));
    ERR_clear_error();
    t->ssl = SSL_new(ctx);
    t->rbio = BIO_new(BIO_s_mem());
    t->wbio = BIO_new(BIO_s_mem());
    if (!t->ssl || !t->rbio || !t->wbio) {
        BIO_free(t->rbio);
        BIO_free(t->wbio);
        SSL_free(t->ssl);
        memset(t, 0, sizeof(*t));
        snprintf(err, errlen, "TLS: out of memory");
        return -1;
    }
    SSL_set_bio(t->ssl, t->rbio, t->wbio); /* the SSL owns them now */
    SSL_set_connect_state(t->ssl);
    int ip = is_ip(name);
    int ok = 1;
    if (!ip) ok = SSL_set_tlsext_host_name(t->ssl, name); /* no SNI for an address (RFC 6066) */
    if (ok && SSL_CTX_get_verify_mode(ctx) != SSL_VERIFY_NONE) {
        X509_VERIFY_PARAM *vp = SSL_get0_param(t->ssl);
        X509_VERIFY_PARAM_set_hostflags(vp, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        ok =
            ip ? X509_VERIFY_PARAM_set1_ip_asc(vp, name) : X509_VERIFY_PARAM_set1_host(vp, name, 0);
    }
    if (!ok) {
        snprintf(err, errlen, "TLS: cannot use %s as the server name: %s", name, ssl_reason());
        ERR_clear_error();
        mg__tls_free(t);
        return -1;
    }
    return 0;
}

void mg__tls_free(mg_tls_t *t)
{
    if (t->ssl) SSL_free(t->ssl); /* and its BIOs */
    memset(t, 0, sizeof(*t));
}

int mg__tls_feed(mg_tls_t *t, const char *p, size_t n)
{
    if (!t->seen && n > 0) {
        t->seen = 1;
        /* an HTTP server that got our ClientHello answers 400 in clear */
        t->plaintext = !t->up && n >= 5 && memcmp(p, "HTTP/", 5) == 0;
    }
    while (n > 0) {
        int chunk = n > 1u << 30 ? 1 << 30 : (int)n;
        int w = BIO_write(t->rbio, p, chunk);
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Words for a failure; hints name the setting that fixes the usual cases. */
static void describe(mg_tls_t *t, const char *stage, int ssl_err, char *msg, size_t cap)
{
    long v = SSL_get_verify_result(t->ssl);
    if (t->plaintext) {
        snprintf(msg, cap,
                 "TLS handshake failed: the server answered in plain HTTP (an http:// endpoint "
                 "given as https://?)");
    } else if (ssl_err == SSL_ERROR_SSL && v != X509_V_OK) {
        const char *hint = "";
        switch (v) {
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
        case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
        case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
        case X509_V_ERR_CERT_UNTRUSTED:
            hint = " (unknown CA: set tls.ca to the CA that signed the server's certificate)";
            break;
        case X509_V_ERR_HOSTNAME_MISMATCH:
        case X509_V_ERR_IP_ADDRESS_MISMATCH:
            hint = " (the certificate does not name this host: use a name it lists, or set "
                   "tls.server_name)";
            break;
        default: break;
        }
        snprintf(msg, cap, "TLS handshake failed: certificate verify failed: %s%s",
                 X509_verify_cert_error_string(v), hint);
    } else if (ERR_peek_last_error()) {
        const char *r = ssl_reason();
        const char *hint = "";
        if (strstr(r, "certificate required") || strstr(r, "alert bad certificate") ||
            strstr(r, "alert unknown ca"))
            hint = " (the server wants a client certificate it trusts: set tls.cert and tls.key)";
        else if (strstr(r, "wrong version number") || strstr(r, "packet length too long"))
            hint = " (the server does not speak TLS: an http:// endpoint given as https://?)";
        snprintf(msg, cap, "TLS %s failed: %s%s", stage, r, hint);
    } else {
        snprintf(msg, cap, "TLS %s failed: the server closed the connection", stage);
    }
    ERR_clear_error();
}

int mg__tls_handshake(mg_tls_t *t, char *msg, size_t cap)
{
    if (t->up) return 1;
    if (t->plaintext) {
        describe(t, "handshake", SSL_ERROR_SSL, msg, cap);
        return -1;
    }
    ERR_clear_error();
    int rc = SSL_do_handshake(t->ssl);
    if (rc == 1) {
        t->up = 1;
        return 1;
    }
    int e = SSL_get_error(t->ssl, rc);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
    describe(t, "handshake", e, msg, cap);
    return -1;
}

int mg__tls_read(mg_tls_t *t, char *buf, size_t cap, char *msg, size_t cap_msg)
{
    ERR_clear_error();
    int rc = SSL_read(t->ssl, buf, cap > 1u << 30 ? 1 << 30 : (int)cap);
    if (rc > 0) return rc;
    int e = SSL_get_error(t->ssl, rc);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
    if (e == SSL_ERROR_ZERO_RETURN) return -1;
    describe(t, "read", e, msg, cap_msg);
    return -2;
}

int mg__tls_write(mg_tls_t *t, const char *p, size_t n, char *msg, size_t cap)
{
    /* a memory BIO takes everything: SSL_write returns only when all of
     * it is in records (no partial writes without SSL_MODE_ENABLE_PARTIAL_WRITE) */
    while (n > 0) {
        int chunk = n > 1u << 30 ? 1 << 30 : (int)n;
        ERR_clear_error();
        int rc = SSL_write(t->ssl, p, chunk);
        if (rc <= 0) {
            describe(t, "write", SSL_get_error(t->ssl, rc), msg, cap);
            return -1;
        }
        p += rc;
        n -= (size_t)rc;
    }
    return 0;
}

size_t mg__tls_out_pending(mg_tls_t *t)
{
    return BIO_ctrl_pending(t->wbio);
}

size_t mg__tls_out(mg_tls_t *t, char *buf, size_t cap)
{
    int n = BIO_read(t->wbio, buf, cap > 1u << 30 ? 1 << 30 : (int)cap);
    return n > 0 ? (size_t)n : 0;
}

int mg__tls_has_input(mg_tls_t *t)
{
    return SSL_pending(t->ssl) > 0 || BIO_ctrl_pending(t->rbio) > 0;
}
