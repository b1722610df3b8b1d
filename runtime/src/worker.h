/* worker.h: what the master (master.c) and the CLI (main.c) need of a worker
 * and of the control process (the same runtime with another handler). */
#ifndef MG_WORKER_H
#define MG_WORKER_H

#include "node.h"

/* What a runtime process is: its Lua handler module and its duties. */
enum {
    MG_ROLE_WORKER = 0,  /* moongate.worker: proxies; its config comes from the control process */
    MG_ROLE_MOCK,        /* moongate.mock: the mock backend, no master, no control process */
    MG_ROLE_CONTROL,     /* moongate.control: owns the config source; status and admin listeners */
    MG_ROLE_WORKER_FILES /* moongate.worker reading the config files itself (the fuzzer) */
};

/* Exit code of a control process that has no configuration to hand out
 * (the source is unreadable or invalid and there is no last-known-good
 * copy): the master then stops the node instead of respawning it.
 * sysexits.h's EX_CONFIG. */
#define MG_EXIT_NO_CONFIG 78

/* Runs one worker (or the mock, or the control process) until it stops;
 * returns the process exit code.
 * listen_fds: bound, listening, non-blocking sockets (a worker: one per
 * conf->listen entry, in order; the control process: status then admin,
 * -1 for one that is off); the process owns them from here on.
 * A worker accepts connections only once it applied its first config
 * version from the control process (channel.c).
 * Signals handled inside: SIGHUP (control process) re-reads the config
 * source; SIGQUIT graceful stop (close listeners, drain in-flight requests,
 * bounded by conf->shutdown_timeout_ms), SIGTERM/SIGINT fast stop.
 * A process whose parent (the master) dies stops gracefully too. */
int mg_worker_main(const mg_node_conf_t *conf, int role, int worker_id, const int *listen_fds,
                   int nfds);

/* Maps the page that the control process keeps the last config version
 * number in (control.c), shared by every process forked after: a respawned
 * control process goes on from there. The master calls it before forking.
 * 0 or a negative errno. */
int mg_control_shared_init(void);

/* The process title (ps, top): main() hands over argv once; a child then
 * overwrites the command line with title (truncated to the original
 * argv's length) and sets the thread name to name (15 bytes at most). */
void mg_proc_title_init(int argc, char **argv);
void mg_proc_title_set(const char *title, const char *name);

#endif
