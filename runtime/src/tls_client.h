/* tls_client.h: the client side of TLS for the runtime's HTTP client
 * (http_client.c): contexts built once per configuration, and one
 * connection's TLS state on two memory BIOs, driven by libuv callbacks.
 *
 * The socket never meets OpenSSL: ciphertext read by libuv is fed to the
 * read BIO (mg__tls_feed), plaintext comes out of SSL_read, and whatever
 * OpenSSL wants to send (handshake records, encrypted requests, alerts)
 * waits in the write BIO until the caller flushes it to uv_write
 * (mg__tls_out). So a handshake is a few loop turns, never a blocking call.
 *
 * Policy: TLS 1.2 and 1.3 only, no renegotiation; the chain is verified
 * against a CA file or the system store, and the name (DNS name or IP
 * address, from the URL host or server_name) against the certificate's
 * SAN, unless verify is off (an explicit opt-out, logged as a warning when
 * the context is built). SNI carries the name when it is a DNS name.
 */
#ifndef MG_TLS_CLIENT_H
#define MG_TLS_CLIENT_H

#include <openssl/ssl.h>
#include <stddef.h>

#include "moongate.h"

/* A context for one configuration (CA, client certificate and key,
 * verify). NULL on error, with err saying what (a file that cannot be
 * read, a key that does not match its certificate...). Costs: reads and
 * parses the files (the system store: OpenSSL's default paths); done once
 * per configuration, then every connection shares it (SSL_CTX is
 * reference-counted: a connection keeps its context alive). */
SSL_CTX *mg__tls_ctx_new(const mg_tls_opts_t *o, char *err, size_t errlen);

/* One connection's TLS (owned by the connection, freed with it). */
typedef struct mg_tls_s {
    SSL *ssl;
    BIO *rbio, *wbio; /* owned by ssl */
    int up;           /* the handshake completed */
    int seen;         /* some server byte arrived */
    int plaintext;    /* the server's first bytes were "HTTP/": it does not speak TLS */
} mg_tls_t;

/* Prepares a client handshake for name (a DNS name or an IP literal,
 * without brackets): SNI for a DNS name, and the name check when ctx
 * verifies. 0, or -1 with err set. */
int mg__tls_init(mg_tls_t *t, SSL_CTX *ctx, const char *name, char *err, size_t errlen);
void mg__tls_free(mg_tls_t *t);

/* Ciphertext from the socket into the read BIO. 0, or -1 (no memory). */
int mg__tls_feed(mg_tls_t *t, const char *p, size_t n);

/* Steps the handshake: 1 done, 0 more bytes needed (flush first), -1
 * failed with msg set ("certificate verify failed: ...", "the server
 * answered in plain HTTP..."). */
int mg__tls_handshake(mg_tls_t *t, char *msg, size_t cap);

/* Plaintext out: > 0 bytes, 0 nothing more for now (flush first), -1 the
 * server closed the TLS session (close_notify), -2 an error (msg set). */
int mg__tls_read(mg_tls_t *t, char *buf, size_t cap, char *msg, size_t cap_msg);

/* Plaintext in: the records wait in the write BIO. 0, or -1 (msg set). */
int mg__tls_write(mg_tls_t *t, const char *p, size_t n, char *msg, size_t cap);

/* Bytes waiting to be sent, and taking them (up to cap) out. */
size_t mg__tls_out_pending(mg_tls_t *t);
size_t mg__tls_out(mg_tls_t *t, char *buf, size_t cap);

/* Plaintext or ciphertext already received but not read: a response
 * followed by bytes nobody asked for. */
int mg__tls_has_input(mg_tls_t *t);

#endif
