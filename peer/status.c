/* status.c: status names and the per-thread "last error" message. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_error[512];

const char *peer_status_string(peer_status status) {
  switch (status) {
  case PEER_OK: return "ok";
  case PEER_ERR_INVALID_ARGUMENT: return "invalid argument";
  case PEER_ERR_CONFIG: return "invalid config";
  case PEER_ERR_OUT_OF_MEMORY: return "out of memory";
  case PEER_ERR_IO: return "i/o error";
  case PEER_ERR_FORMAT: return "malformed file";
  case PEER_ERR_NONFINITE: return "non-finite value";
  case PEER_ERR_SHAPE: return "shape or dtype mismatch";
  case PEER_ERR_UNSUPPORTED: return "unsupported";
  case PEER_ERR_NO_DEVICE: return "no device";
  case PEER_ERR_CUDA: return "cuda error";
  case PEER_ERR_STATE: return "call out of order";
  case PEER_ERR_BUSY: return "layer busy";
  }
  return "unknown status";
}

const char *peer_last_error(void) { return last_error; }

void peer_clear_error(void) { last_error[0] = '\0'; }

peer_status peer_fail(peer_status status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return status;
}

int peer_version_number(void) { return PEER_VERSION_NUMBER; }

const char *peer_version_string(void) {
#define PEER_STR2(x) #x
#define PEER_STR(x) PEER_STR2(x)
  return PEER_STR(PEER_VERSION_MAJOR) "." PEER_STR(PEER_VERSION_MINOR) "." PEER_STR(
      PEER_VERSION_PATCH);
}
