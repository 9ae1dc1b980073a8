/* The hosted build's API (hosted.c), for the fuzzer and for ctypes. */
#ifndef AIODD_HOSTED_H
#define AIODD_HOSTED_H

#include <stdint.h>

/* Answers an open request: AIODD_OK with a file added by hosted_add_file (its handle,
 * size and AIODD_FMT_* format), or anything else for a refusal. */
typedef uint32_t (*hosted_opener)(uint32_t referrer, uint32_t kind, const char *name,
                                  uint64_t name_length, const char *format, uint64_t format_length,
                                  uint32_t *handle, uint64_t *size, uint32_t *format_code);

/* Forget the files, the open image and the heap. */
void hosted_reset(void);
/* A file, as bytes the caller keeps alive; returns its handle (the first one is 0). */
uint32_t hosted_add_file(const unsigned char *data, uint64_t size);
void hosted_set_opener(hosted_opener opener);
/* CMD_OPEN of handle 0 and CMD_READ, as the guest's main loop runs them. */
uint32_t hosted_open(uint32_t format, uint64_t *virtual_size);
uint32_t hosted_read(uint64_t offset, unsigned char *dest, uint64_t length);
/* A command of a decoder that reads file 0's first byte into its output, dest[0] (what
 * it then holds goes to seen), and with `overwrite` writes over it before the command
 * ends, as no decoder may: the check that catches one (tests only). */
uint32_t hosted_write_after_read(unsigned char *dest, int overwrite, unsigned char *seen);
/* The error last recorded (AIODD_E_IMAGE, AIODD_E_UNSUPPORTED). */
const char *hosted_error(uint64_t *length, uint32_t *layer);
/* Doorbells rung since the reset (OP_READV, OP_OPEN), and the heap's high-water mark. */
uint64_t hosted_doorbells(void);
uint64_t hosted_heap_peak(void);

#endif
