/* token.c: `moectl hash-token`, the sha256:<hex> form in which a tenant's
 * bearer tokens are written in its config (Tokens=), so that the config
 * never holds a usable secret. Needs no daemon. */
#include "moectl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "common/cleanup.h"

/* A token read from a terminal is not echoed; from a pipe, its first line
 * is the token (without the line ending). */
static char *read_token(void)
{
        struct termios old, quiet;
        bool tty = isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &old) == 0;
        char *line = NULL;
        size_t cap = 0;
        ssize_t n;

        if (tty) {
                fputs("token: ", stderr);
                quiet = old;
                quiet.c_lflag &= ~(tcflag_t)ECHO;
                tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet);
        }
        n = getline(&line, &cap, stdin);
        if (tty) {
                tcsetattr(STDIN_FILENO, TCSAFLUSH, &old);
                fputc('\n', stderr);
        }
        if (n < 0) {
                free(line);
                return NULL;
        }
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
                line[--n] = 0;
        return line;
}

int cmd_hash_token(const char *token)
{
        _cleanup_free_ char *in = NULL;
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int mdlen = 0;
        bool ok;

        if (!token) {
                in = read_token();
                if (!in) {
                        moectl_err("hash-token: no token on stdin");
                        return MOECTL_USAGE;
                }
                token = in;
        }
        if (!token[0]) {
                moectl_err("hash-token: the token is empty");
                if (in)
                        explicit_bzero(in, strlen(in));
                return MOECTL_USAGE;
        }
        ok = EVP_Digest(token, strlen(token), md, &mdlen, EVP_sha256(), NULL) == 1;
        if (in)
                explicit_bzero(in, strlen(in));
        if (!ok) {
                moectl_err("hash-token: SHA-256 failed");
                return MOECTL_FAILED;
        }
        printf("sha256:");
        for (unsigned int i = 0; i < mdlen; i++)
                printf("%02x", md[i]);
        printf("\n");
        return MOECTL_OK;
}
