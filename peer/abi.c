/* abi.c: the sizes of the public structs as this library was compiled, so
 * that bindings re-declaring them (tools/python/peerlayer) can check their
 * copies at load time instead of trusting them. */
#include "internal.h"

#include <string.h>

size_t peer_struct_size(const char *name) {
  static const struct {
    const char *name;
    size_t size;
  } sizes[] = {{"peer_config", sizeof(peer_config)},
               {"peer_options", sizeof(peer_options)},
               {"peer_tensor", sizeof(peer_tensor)},
               {"peer_grads", sizeof(peer_grads)},
               {"peer_optim_config", sizeof(peer_optim_config)}};
  if (!name) return 0;
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
    if (strcmp(sizes[i].name, name) == 0) return sizes[i].size;
  return 0;
}
