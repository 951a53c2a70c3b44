/* testutil: small helpers shared by the cmocka tests: a private temporary
 * directory, fixture models written on demand, relative-error checks. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A fresh directory under $MOED_TEST_TMP (or /tmp), removed at exit. */
const char *tu_tmpdir(void);
/* tu_tmpdir()/name; the string lives until the process exits. */
char *tu_path(const char *name);
/* Writes the named fixture shape (tools/fixture.h) with the given weight
 * type to a temporary file once per process and returns its path. with_vocab
 * uses the real DeepSeek-V3 vocabulary (fails the test if it is missing). */
const char *tu_fixture(const char *shape, int weight_type, bool with_vocab);
/* ||a - b|| / ||b|| over n floats. */
double tu_rel_err(const float *a, const float *b, size_t n);
/* Max |a-b|. */
double tu_max_abs(const float *a, const float *b, size_t n);
/* Deterministic pseudo-random floats in [-1, 1). */
void tu_randf(float *x, size_t n, uint64_t seed);
