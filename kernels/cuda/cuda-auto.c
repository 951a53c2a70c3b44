/* cuda-auto: the run-time choice between the CUDA backend and the CPU,
 * from a Devices= setting and what the driver reports, and the log line
 * that says which devices were found and used. Built in every
 * configuration: without CUDA it also stands in for the CUDA entry points
 * (no devices, -ENODEV), so callers need no #if. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "kernels/cuda/cuda-backend.h"
#include "moed-config.h"

#define MAX_DEVICES 64
#define GIB (1024.0 * 1024.0 * 1024.0)

bool mo_backend_is_cuda(const mo_backend *b)
{
        return b && b->ops && b->ops->name && strcmp(b->ops->name, "cuda") == 0;
}

int mo_cuda_device_count(void)
{
        return mo_cuda_probe(NULL, 0);
}

#if !MOED_HAVE_CUDA
int mo_cuda_probe(char *why, size_t cap)
{
        if (why && cap)
                snprintf(why, cap, "moed was built without CUDA");
        return 0;
}

int mo_cuda_device_info(int device, struct mo_cuda_device_info *info, struct moerr *e)
{
        return moerr_set(e, -ENODEV, "CUDA device %d: moed was built without CUDA", device);
}

int mo_backend_cuda_new(int device, mo_backend **out, struct moerr *e)
{
        return moerr_set(e, -ENODEV, "CUDA device %d: moed was built without CUDA", device);
}

int mo_cuda_backend_device(const mo_backend *b)
{
        return -1;
}

int mo_cuda_upload_weights(mo_backend *b, const struct mo_cuda_region *regions, size_t n,
                           mo_cuda_progress_fn progress, void *userdata, struct moerr *e)
{
        return moerr_set(e, -EINVAL, "weights upload: not a CUDA backend");
}

int mo_cuda_mem_info(mo_backend *b, uint64_t *free_bytes, uint64_t *total_bytes,
                     struct moerr *e)
{
        return moerr_set(e, -EINVAL, "memory info: not a CUDA backend");
}

uint64_t mo_cuda_weight_bytes(const mo_backend *b)
{
        return 0;
}

void mo_cuda_release_weights(mo_backend *b)
{
}
#endif

/* Devices=: all (also NULL or empty), cpu, or device numbers separated by
 * commas and/or spaces. */
struct dev_sel {
        bool all, cpu;
        int ids[MAX_DEVICES];
        int n;
};

static int parse_devices(const char *s, struct dev_sel *sel, struct moerr *e)
{
        const char *p = s ? s : "";

        memset(sel, 0, sizeof *sel);
        p += strspn(p, " \t");
        if (!*p || strcasecmp(p, "all") == 0) {
                sel->all = true;
                return 0;
        }
        if (strcasecmp(p, "cpu") == 0) {
                sel->cpu = true;
                return 0;
        }
        while (*p) {
                char *end;
                long v;

                if (*p < '0' || *p > '9')
                        return moerr_set(e, -EINVAL,
                                         "Devices=%s: expected all, cpu, or device numbers", s);
                v = strtol(p, &end, 10);
                if (v >= MAX_DEVICES)
                        return moerr_set(e, -EINVAL, "Devices=%s: device %ld is out of range", s, v);
                for (int i = 0; i < sel->n; i++)
                        if (sel->ids[i] == v)
                                return moerr_set(e, -EINVAL, "Devices=%s: device %ld is listed twice",
                                                 s, v);
                sel->ids[sel->n++] = (int)v;
                p = end + strspn(end, " \t");
                if (*p == ',') {
                        p++;
                        p += strspn(p, " \t");
                        if (!*p)
                                return moerr_set(e, -EINVAL, "Devices=%s: trailing comma", s);
                }
        }
        return 0;
}

/* Appends to a bounded line; output past the end is dropped. */
__attribute__((format(printf, 3, 4)))
static void addf(char *buf, size_t cap, const char *fmt, ...)
{
        size_t len = strnlen(buf, cap);
        va_list ap;

        if (len + 1 >= cap)
                return;
        va_start(ap, fmt);
        vsnprintf(buf + len, cap - len, fmt, ap);
        va_end(ap);
}

static void describe_found(char *buf, size_t cap, int n)
{
        for (int d = 0; d < n; d++) {
                struct mo_cuda_device_info info;

                if (mo_cuda_device_info(d, &info, NULL) < 0)
                        addf(buf, cap, "%sCUDA %d (unreadable)", d ? ", " : "", d);
                else
                        addf(buf, cap, "%sCUDA %d (%s, %.1f GiB)", d ? ", " : "", d, info.name,
                             (double)info.total_bytes / GIB);
        }
}

static int use_cpu(int threads, mo_backend **out, int *n_out, char *line, size_t cap,
                   struct moerr *e)
{
        int r = mo_backend_cpu_new(threads, out, e);

        if (r < 0)
                return r;
        *n_out = 1;
        addf(line, cap, "; using the CPU with %d thread%s", mo_cpu_threads(*out),
             mo_cpu_threads(*out) == 1 ? "" : "s");
        return 0;
}

int mo_backends_auto_new(const char *devices, int threads, mo_backend **out, int max_out,
                         int *n_out, char *log_line, size_t cap, struct moerr *e)
{
        char why[256], line[1024] = "devices: ", skipped[512] = "";
        struct dev_sel sel;
        int n, r, made = 0;

        *n_out = 0;
        if (max_out < 1)
                return moerr_set(e, -EINVAL, "no room for a backend");
        r = parse_devices(devices, &sel, e);
        if (r < 0)
                return r;
        n = mo_cuda_probe(why, sizeof why);
        if (sel.n) {
                for (int i = 0; i < sel.n; i++)
                        if (sel.ids[i] >= n)
                                return moerr_set(e, -ENODEV, "Devices=%s: CUDA device %d not found "
                                                 "(%d present%s%s)", devices, sel.ids[i], n,
                                                 n ? "" : "; ", n ? "" : why);
        } else {
                for (int d = 0; d < n && sel.n < MAX_DEVICES; d++)
                        sel.ids[sel.n++] = d;
        }
        if (n == 0) {
                addf(line, sizeof line, "no CUDA device found (%s)", why);
        } else {
                describe_found(line, sizeof line, n);
                if (sel.cpu)
                        addf(line, sizeof line, " found, not used (Devices=cpu)");
        }
        if (sel.cpu || n == 0) {
                r = use_cpu(threads, out, n_out, line, sizeof line, e);
                goto done;
        }
        for (int i = 0; i < sel.n && made < max_out; i++) {
                struct moerr ce = { { 0 } };

                r = mo_backend_cuda_new(sel.ids[i], &out[made], &ce);
                if (r == 0) {
                        made++;
                        continue;
                }
                if (!sel.all) { /* a device asked for by number must work */
                        while (made > 0)
                                mo_backend_free(out[--made]);
                        return moerr_set(e, r, "Devices=%s: %s", devices, ce.msg);
                }
                addf(skipped, sizeof skipped, "%s%s", skipped[0] ? "; " : "", ce.msg);
        }
        if (skipped[0])
                addf(line, sizeof line, "; unusable: %s", skipped);
        if (made == 0) {
                r = use_cpu(threads, out, n_out, line, sizeof line, e);
                goto done;
        }
        addf(line, sizeof line, "; using");
        for (int i = 0; i < made; i++)
                addf(line, sizeof line, "%s CUDA %d", i ? "," : "", mo_cuda_backend_device(out[i]));
        *n_out = made;
        r = 0;
done:
        if (r == 0 && log_line && cap)
                snprintf(log_line, cap, "%s", line);
        return r;
}

int mo_backend_auto_new(const char *devices, int threads, mo_backend **out, char *log_line,
                        size_t cap, struct moerr *e)
{
        int n;

        return mo_backends_auto_new(devices, threads, out, 1, &n, log_line, cap, e);
}
