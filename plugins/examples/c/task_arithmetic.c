/* `c-task-arithmetic`: λ Σ w δ over the experts holding each entry, written in plain C against
 * include/xpm_plugin.h to show the plugin ABI is language-neutral.
 *
 *   cc -shared -fPIC -O2 -I plugins/xpm-plugin-api/include \
 *      plugins/examples/c/task_arithmetic.c -o libxpm_c_task_arithmetic.so
 *
 * Parameters: {"lambda": number} (default 1). Add -DXPM_EXPERT_VALUES to read each expert's
 * values where xpm holds them (ABI 1.1, XPM_CAP_EXPERT_VALUES: no copy; xpm 1.0 hosts refuse
 * such a build). */
#include <stdlib.h>
#include <string.h>
#include "xpm_plugin.h"

#ifndef XPM_TEST_ABI_MAJOR
#define XPM_TEST_ABI_MAJOR XPM_PLUGIN_ABI_MAJOR
#endif

#ifndef XPM_TEST_NAME
#define XPM_TEST_NAME "c-task-arithmetic"
#endif
static const char NAME[] = XPM_TEST_NAME;
#ifndef XPM_TEST_VERSION
#define XPM_TEST_VERSION "1.0.0"
#endif
static const char VERSION[] = XPM_TEST_VERSION;
static const char SCHEMA[] =
    "{\"type\":\"object\",\"properties\":{\"lambda\":{\"type\":\"number\"}},"
    "\"additionalProperties\":false}";

typedef struct { double lambda; } State;

static XpmStr str_of(const char *s) { XpmStr r = { (const uint8_t *)s, strlen(s) }; return r; }

static void set_err(XpmBuf *err, const char *msg) {
    size_t n = strlen(msg);
    uint8_t *p = malloc(n);
    memcpy(p, msg, n);
    err->ptr = p;
    err->len = n;
}

static XpmStr params_schema(void) { return str_of(SCHEMA); }

static int32_t create(XpmStr params, void **state, XpmBuf *err) {
    /* The host has validated `params` against SCHEMA: an object with at most a number. */
    char buf[256];
    size_t n = params.len < sizeof buf - 1 ? params.len : sizeof buf - 1;
    memcpy(buf, params.ptr, n);
    buf[n] = 0;
    State *s = malloc(sizeof *s);
    if (!s) { set_err(err, "out of memory"); return XPM_ERR; }
    s->lambda = 1.0;
    const char *l = strstr(buf, "\"lambda\"");
    if (l) {
        l = strchr(l, ':');
        if (l) s->lambda = strtod(l + 1, NULL);
    }
    *state = s;
    return XPM_OK;
}

static int32_t merge(void *state, const XpmTensorView *t, XpmOutputView *out, XpmBuf *err) {
    const State *s = state;
    size_t n = t->support_len;
    if (out->capacity != n) { set_err(err, "output capacity differs from the support"); return XPM_ERR; }
#ifdef XPM_TEST_DROP_ODD
    /* Test build: the host must preset every keep flag to 1 and every value to 0 on each call
     * (it reuses these arrays from tensor to tensor); then drop the odd support entries. */
    for (size_t k = 0; k < n; k++)
        if (out->keep[k] != 1 || out->values[k] != 0.0f) { set_err(err, "output not preset"); return XPM_ERR; }
    for (size_t k = 1; k < n; k += 2) out->keep[k] = 0;
#endif
#ifdef XPM_TEST_NO_COPY
    /* Test build (with XPM_EXPERT_VALUES): the host must not have concatenated the values. */
    if (t->entry_value != NULL) { set_err(err, "entry_value is set despite XPM_CAP_EXPERT_VALUES"); return XPM_ERR; }
#endif
#ifdef XPM_TEST_BAD_KEEP
    if (n) out->keep[0] = 2; /* Test build: a keep flag other than 0 or 1. */
#endif
    double *acc = calloc(n ? n : 1, sizeof *acc);
    if (!acc) { set_err(err, "out of memory"); return XPM_ERR; }
    /* Each expert's entries: positions into the support and values. */
    for (size_t e = 0; e < t->n_experts; e++) {
#ifdef XPM_EXPERT_VALUES
        /* ABI 1.1 (XPM_CAP_EXPERT_VALUES): the expert's values where the host holds them. */
        const float *v = t->expert_values[e];
        size_t first = t->entries_start[e];
#else
        const float *v = t->entry_value;
        size_t first = 0;
#endif
        for (size_t i = t->entries_start[e]; i < t->entries_start[e + 1]; i++)
            acc[t->entry_slot[i]] += t->weights[e] * (double)v[i - first];
    }
    for (size_t k = 0; k < n; k++) out->values[k] = (float)(s->lambda * acc[k]);
    free(acc);
#ifdef XPM_TEST_SHORT_OUTPUT
    out->written = n ? n - 1 : 0;
#else
    out->written = n;
#endif
    return XPM_OK;
}

static void destroy(void *state) { free(state); }
static void free_buf(XpmBuf b) { free(b.ptr); }

static XpmPluginDescriptorV1 DESCRIPTOR;

#ifdef XPM_TEST_NO_SYMBOL
const XpmPluginDescriptorV1 *xpm_merge_plugin_v0(void) {
#else
const XpmPluginDescriptorV1 *xpm_merge_plugin_v1(void) {
#endif
    DESCRIPTOR.size = sizeof DESCRIPTOR;
#ifdef XPM_TEST_SMALL_DESCRIPTOR
    DESCRIPTOR.size = 24;
#endif
#ifdef XPM_TEST_BIG_DESCRIPTOR
    /* Test build: a descriptor from a later minor version, with fields appended past 1.0. */
    DESCRIPTOR.size = sizeof DESCRIPTOR + 16;
#endif
    DESCRIPTOR.abi_major = XPM_TEST_ABI_MAJOR;
    DESCRIPTOR.abi_minor = XPM_PLUGIN_ABI_MINOR;
    DESCRIPTOR.name = str_of(NAME);
    DESCRIPTOR.version = str_of(VERSION);
#if defined(XPM_TEST_DROP_ODD) && !defined(XPM_TEST_UNDECLARED_DROP)
    DESCRIPTOR.capabilities = XPM_CAP_DROPS_ENTRIES;
#else
    DESCRIPTOR.capabilities = 0;
#endif
#ifdef XPM_EXPERT_VALUES
    DESCRIPTOR.capabilities |= XPM_CAP_EXPERT_VALUES; /* ABI 1.1 hosts only: 1.0 refuses it. */
#endif
#ifdef XPM_TEST_REQUIRED_CAP
    DESCRIPTOR.capabilities |= 1ull << 40; /* Test build: a required capability no host knows. */
#endif
    DESCRIPTOR.params_schema = params_schema;
    DESCRIPTOR.create = create;
#ifdef XPM_TEST_NULL_MERGE
    DESCRIPTOR.merge = NULL;
    (void)merge;
#else
    DESCRIPTOR.merge = merge;
#endif
    DESCRIPTOR.destroy = destroy;
    DESCRIPTOR.free_buf = free_buf;
    return &DESCRIPTOR;
}
