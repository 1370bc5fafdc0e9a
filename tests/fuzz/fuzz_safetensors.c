/* fuzz_safetensors.c: libFuzzer harness for the generic safetensors reader:
 * open (header, offsets, overlaps), then describe, look up and read every
 * tensor and look up metadata, as an activation-file reader would. */
#include "fuzz_input.h" /* first: it defines _GNU_SOURCE */

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  peer_safetensors *f = NULL;
  peer_status st = peer_safetensors_open(&f, fuzz_file(data, size));
  fuzz_check_failure(st);
  if (st) return 0;
  for (int i = 0; i < peer_safetensors_count(f); i++) {
    peer_tensor t, again;
    if (peer_safetensors_info(f, i, &t)) abort();
    if (peer_safetensors_find(f, t.name, &again) || again.nbytes != t.nbytes) abort();
    /* a tensor's bytes lie inside the file: reading them costs at most it */
    if (t.nbytes > size) abort();
    void *buf = malloc(t.nbytes ? t.nbytes : 1);
    if (peer_safetensors_read(f, t.name, buf, t.nbytes)) abort();
    free(buf);
  }
  (void)peer_safetensors_metadata(f, "peer.format");
  peer_safetensors_close(f);
  return 0;
}
