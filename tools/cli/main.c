/* main.c: the `peer` command-line tool.  It creates and inspects PEER weight
 * files, makes random input files, runs a layer over activation files, checks
 * product-key retrieval against brute force, converts to and from
 * PEER-pytorch, and runs the demo that tools/run shows.  One file per
 * command (cli.h lists them); this one picks the command. */
#include "cli.h"

#include <stdio.h>
#include <string.h>

typedef struct command {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *summary;
} command;

static const command commands[] = {
    {"init", cmd_init, "create a layer, initialise it from a seed, save it"},
    {"info", cmd_info, "show a weight file's config, parameters, tensors, cost per token"},
    {"random", cmd_random, "write a seeded random F32 tensor (inputs for forward and grad)"},
    {"forward", cmd_forward, "run a layer on x from a file, write y (and indices, gates)"},
    {"grad", cmd_grad, "training forward + backward on x and dy, write dx and every gradient"},
    {"check", cmd_check, "compare product-key retrieval with brute force"},
    {"demo", cmd_demo, "time a million-expert layer and check it against brute force"},
    {"convert", cmd_convert, "convert weights from or to lucidrains' PEER-pytorch layout"},
    {"shard", cmd_shard, "split a weight file into P shard files (d/P columns each), or merge them"},
};
enum { N_COMMANDS = sizeof commands / sizeof commands[0] };

static void print_usage(void) {
  printf("peer %s: PEER layer (product-key retrieval over a million experts)\n\n",
         peer_version_string());
  printf("usage: peer COMMAND [options]    (peer COMMAND --help for its options)\n\n");
  printf("commands:\n");
  for (int i = 0; i < N_COMMANDS; i++)
    printf("  %-8s %s\n", commands[i].name, commands[i].summary);
  printf("\noptions:\n  -h, --help     this text\n  --version      the library version\n");
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "peer: missing command (try 'peer --help')\n");
    return CLI_EXIT_USAGE;
  }
  const char *name = argv[1];
  if (strcmp(name, "-h") == 0 || strcmp(name, "--help") == 0 || strcmp(name, "help") == 0) {
    print_usage();
    return 0;
  }
  if (strcmp(name, "--version") == 0 || strcmp(name, "version") == 0) {
    printf("peer %s\n", peer_version_string());
    return 0;
  }
  for (int i = 0; i < N_COMMANDS; i++) {
    if (strcmp(name, commands[i].name) == 0) {
      static char prefix[64];
      snprintf(prefix, sizeof prefix, "peer: %s", name);
      cli_set_prefix(prefix);
      cli_remove_temporaries_on_signals();
      return commands[i].run(argc - 2, argv + 2);
    }
  }
  fprintf(stderr, "peer: %s: unknown command (try 'peer --help')\n", name);
  return CLI_EXIT_USAGE;
}
