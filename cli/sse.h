/* sse: an incremental reader of Server-Sent Events (text/event-stream).
 * Bytes arrive in arbitrary pieces (a line may be split across libcurl
 * write callbacks); whole events' data are handed to a callback. */
#pragma once
#include <stddef.h>

/* Called once per event with its data (the "data:" lines joined by "\n",
 * NUL-terminated). A negative return stops the stream and is returned by
 * sse_feed/sse_finish. */
typedef int (*sse_event_fn)(void *ud, const char *data, size_t len);

struct sse {
        sse_event_fn event;
        void *ud;
        char *line;             /* the line being received, not yet ended */
        size_t line_len, line_cap;
        char *data;             /* the event being received */
        size_t data_len, data_cap;
        int has_data;           /* a "data:" line was seen in this event */
        int pending_cr;         /* the last piece ended in CR */
};

/* A line or event above this is refused (-E2BIG): moed's chunks are small. */
#define SSE_MAX_LINE (16u << 20)

void sse_init(struct sse *s, sse_event_fn event, void *ud);
/* 0, the callback's negative return, -ENOMEM or -E2BIG. */
int sse_feed(struct sse *s, const char *buf, size_t n);
/* End of stream: an event whose blank line never came is still delivered
 * (a server that closes right after its last data line loses nothing). */
int sse_finish(struct sse *s);
void sse_free(struct sse *s);
