/* master.h: the master process (listeners, pid file, worker supervision). */
#ifndef MG_MASTER_H
#define MG_MASTER_H

#include <sys/types.h>

#include "node.h"

/* Runs the master until it stops; returns the process exit code (0 after a
 * SIGQUIT/SIGTERM/SIGINT stop, 1 when it cannot start: node already
 * running, port in use, pid file not writable). Opens conf->workers
 * SO_REUSEPORT sockets per listener (one accept queue per worker), writes
 * conf->pid_file, forks the workers and respawns any that dies.
 * Signals: SIGHUP re-checks the config and forwards SIGHUP to the workers
 * (the running node settings stay: listen, workers, limits, log and paths
 * need a restart, and a reload that changes them says so in the log);
 * SIGQUIT graceful stop (bounded by shutdown_timeout_ms + 1 s, then
 * SIGKILL); SIGTERM/SIGINT fast stop (bounded by 5 s).
 * daemonize: after the listeners are open (so port errors still reach the
 * terminal), detach (double fork + setsid), stdin and stdout to /dev/null,
 * stderr (the error log) appended to <prefix>/moongate.log. The calling
 * process then exits 0 once the pid file is written, or 1 with the reason. */
int mg_master_run(mg_node_conf_t *conf, int daemonize);

/* The pid of the live moongate process that pid_file names; 0 when the file
 * is absent, stale (no such process, a zombie, or a process that is not
 * moongate), or unparsable; negative errno when it cannot be read. */
pid_t mg_master_pid(const char *pid_file);

/* 1 while pid is a running (not zombie) moongate process, else 0. */
int mg_master_alive(pid_t pid);

#endif
