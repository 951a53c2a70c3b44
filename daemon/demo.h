/* demo: the built-in demo model of per-user mode: the "tiny" fixture shape
 * with random weights and the DeepSeek-V3 vocabulary, written once into the
 * user's cache directory. Its text is gibberish by design; it shows the
 * whole path working without a download. */
#pragma once
#include "common/moerr.h"

/* Path of the demo model, written first if missing ($MOED_DEMO_MODEL wins). */
int demo_model_path(char **out, struct moerr *e);
