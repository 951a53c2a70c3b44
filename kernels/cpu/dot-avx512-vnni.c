/* dot-avx512-vnni.c: the AVX-512 kernels again, compiled with VNNI so that
 * CPUs that have it (Ice Lake and later, Zen 4) fuse the integer steps.
 * Same source as dot-avx512.c; only the table's name differs. */
#include "kernels/cpu/dot-avx512.c"
