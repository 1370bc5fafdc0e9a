/* fuzz_config.c: libFuzzer harness for the config parser: any text either
 * parses (and then validates or fails with a message, and a valid config
 * formats and parses back to itself) or fails with a message, leaving the
 * config unchanged. */
#include "fuzz_input.h" /* first: it defines _GNU_SOURCE */

#include <string.h>

/* A config as its text (every field; no padding bytes compared). */
static void text_of(const peer_config *c, char *buf, size_t size) {
  int len = peer_config_format(c, buf, size);
  if (len < 0 || (size_t)len >= size) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = malloc(size + 1);
  memcpy(text, data, size);
  text[size] = '\0';
  peer_config c;
  peer_config_default(&c);
  char before[1024], after[1024], again[1024];
  text_of(&c, before, sizeof before);
  peer_status st = peer_config_parse(&c, text);
  fuzz_check_failure(st);
  text_of(&c, after, sizeof after);
  if (st && strcmp(before, after) != 0) abort(); /* unchanged on failure */
  if (!st && !(st = peer_config_validate(&c))) {
    peer_config back;
    peer_config_default(&back);
    if (peer_config_parse(&back, after)) abort();
    text_of(&back, again, sizeof again);
    if (strcmp(after, again) != 0) abort(); /* the text reads back as itself */
  }
  fuzz_check_failure(st);
  free(text);
  return 0;
}
