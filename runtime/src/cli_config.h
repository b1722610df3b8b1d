/* cli_config.h: `moongate config dump|push` (cli_config.c). */
#ifndef MG_CLI_CONFIG_H
#define MG_CLI_CONFIG_H

/* Runs lua/moongate/admin_cli.lua's run(sub, file, conf_path) against the
 * Admin API named by the node config at conf_path. sub: "dump" or "push";
 * file: the routes.json to push (NULL for dump). Returns the exit code. */
int mg_cli_config(const char *sub, const char *file, const char *conf_path);

#endif
