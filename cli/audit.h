/* audit.h: `moectl audit`, the commands on moed's audit file (AuditFile=)
 * that need no daemon. */
#pragma once

/* argv: the words after "audit" (argc of them). Returns the exit status:
 * 0 the chain is intact, 1 it is broken or a file cannot be read, 2 bad
 * usage. */
int cmd_audit(int argc, char **argv);
