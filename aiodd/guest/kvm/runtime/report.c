/* Error messages: a small printf for the decoders' messages, and the last error.
 *
 * Conversions: %% ; %s (NUL-terminated) and %.*s (a length, then the bytes: names
 * quoted from an image need not be NUL-terminated nor valid UTF-8; the host decodes
 * them as Python decodes them, with surrogateescape) ; %u %lu in decimal ; %x %lx with
 * the flags '#' and '0' and a width.  Anything else is copied as it stands. */
#include "host.h"

struct out {
    char *buf;
    size_t capacity;
    size_t length;
};

static void put(struct out *o, char c) {
    if (o->length < o->capacity) {
        o->buf[o->length] = c;
    }
    o->length++;
}

static void put_bytes(struct out *o, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        put(o, s[i]);
    }
}

static void put_number(struct out *o, uint64_t value, unsigned base, int prefix, int zero_pad,
                       size_t width) {
    char digits[20];
    size_t n = 0;
    do {
        digits[n++] = "0123456789abcdef"[value % base];
        value /= base;
    } while (value != 0);
    size_t length = n + (prefix ? 2u : 0u);
    if (!zero_pad) {
        for (; length < width; length++) {
            put(o, ' ');
        }
    }
    if (prefix) {
        put(o, '0');
        put(o, 'x');
    }
    if (zero_pad) {
        for (; length < width; length++) {
            put(o, '0');
        }
    }
    while (n > 0) {
        put(o, digits[--n]);
    }
}

size_t aiodd_vformat(char *buf, size_t capacity, const char *format, va_list args) {
    struct out o = {buf, capacity, 0};
    for (const char *p = format; *p != '\0'; p++) {
        if (*p != '%') {
            put(&o, *p);
            continue;
        }
        const char *start = p++;
        int prefix = 0;
        int zero_pad = 0;
        for (;; p++) {
            if (*p == '#') {
                prefix = 1;
            } else if (*p == '0') {
                zero_pad = 1;
            } else {
                break;
            }
        }
        size_t width = 0;
        while (*p >= '0' && *p <= '9') {
            width = width * 10 + (size_t)(*p++ - '0');
        }
        int precision = -1;
        if (p[0] == '.' && p[1] == '*') {
            precision = va_arg(args, int);
            p += 2;
        }
        int wide = 0;
        while (*p == 'l') {
            wide = 1;
            p++;
        }
        switch (*p) {
        case '%':
            put(&o, '%');
            break;
        case 's': {
            const char *s = va_arg(args, const char *);
            if (precision >= 0) {
                put_bytes(&o, s, (size_t)precision);
            } else {
                while (*s != '\0') {
                    put(&o, *s++);
                }
            }
            break;
        }
        case 'u':
        case 'x': {
            uint64_t value = wide ? (uint64_t)va_arg(args, unsigned long)
                                  : (uint64_t)va_arg(args, unsigned int);
            put_number(&o, value, *p == 'x' ? 16u : 10u, prefix, zero_pad, width);
            break;
        }
        default:  /* not a conversion this formatter knows: the text as written */
            put_bytes(&o, start, (size_t)(p - start) + (*p != '\0'));
            if (*p == '\0') {
                p--;
            }
            break;
        }
    }
    return o.length < capacity ? o.length : capacity;
}

/* The message travels in REQ behind a struct aiodd_error. */
#define MESSAGE_CAPACITY (AIODD_REQ_SIZE - sizeof(struct aiodd_error))

static char message[MESSAGE_CAPACITY];
static size_t message_length;
static uint32_t message_layer;

uint32_t host_verror(uint32_t status, uint32_t layer, const char *format, va_list args) {
    message_length = aiodd_vformat(message, sizeof message, format, args);
    message_layer = layer;
    return status;
}

uint32_t host_error(uint32_t status, uint32_t layer, const char *format, ...) {
    va_list args;
    va_start(args, format);
    host_verror(status, layer, format, args);
    va_end(args);
    return status;
}

const char *host_error_message(size_t *length, uint32_t *layer) {
    *length = message_length;
    *layer = message_layer;
    return message;
}
