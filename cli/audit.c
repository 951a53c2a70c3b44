/* audit.c: `moectl audit verify FILE...`: checks the hash chain of moed's
 * audit file and its rotated predecessors and says where it breaks. Reads
 * the files directly (no daemon), through the checker the daemon shares
 * (policy/audit-verify.c: jansson and libcrypto only). */
#include "cli/audit.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "cli/moectl.h"
#include "policy/audit-verify.h"

static int audit_usage(const char *why)
{
        moectl_err("audit: %s (usage: moectl audit verify FILE...)", why);
        return MOECTL_USAGE;
}

int cmd_audit(int argc, char **argv)
{
        struct audit_verify_result res;
        int r;

        if (argc < 1)
                return audit_usage("missing subcommand");
        if (strcmp(argv[0], "verify") != 0)
                return audit_usage("unknown subcommand");
        if (argc < 2)
                return audit_usage("verify: missing FILE");
        r = audit_verify_files((const char *const *)argv + 1, (size_t)argc - 1, stdout, &res);
        fflush(stdout);
        if (r == -EBADMSG) {
                moectl_err("audit verify: the chain is broken: first at %s:%zu (%s)",
                           res.first_path, res.first_line, audit_problem_name(res.first));
                return MOECTL_FAILED;
        }
        if (r < 0) {
                moectl_err("audit verify: %s", strerror(-r));
                return MOECTL_FAILED;
        }
        return MOECTL_OK;
}
