/* worker.h: what the master (master.c) and the CLI (main.c) need of a worker. */
#ifndef MG_WORKER_H
#define MG_WORKER_H

#include "node.h"

/* Runs one worker until it stops; returns the process exit code.
 * listen_fds: bound, listening, non-blocking sockets (one per conf->listen
 * entry, in order); the worker owns them from here on.
 * Signals handled inside: SIGHUP reload routes and Lua modules between
 * requests, SIGQUIT graceful stop (close listeners, drain in-flight requests,
 * bounded by conf->shutdown_timeout_ms), SIGTERM/SIGINT fast stop.
 * A worker whose parent (the master) dies stops gracefully too. */
int mg_worker_main(const mg_node_conf_t *conf, int worker_id, const int *listen_fds, int nfds);

#endif
