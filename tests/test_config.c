/* test_config.c: the layer's configuration (defaults, parsing, validation,
 * formatting), status names, the parameter listing of PEER.md, seeded
 * initialisation, parameter counts, and the usage metrics of PEER.md, each
 * against values worked out by hand. */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include "reference.h"

static int same_config(const peer_config *a, const peer_config *b) {
  return a->d_model == b->d_model && a->n_heads == b->n_heads && a->d_key == b->d_key &&
         a->n_subkeys == b->n_subkeys && a->top_k == b->top_k &&
         a->subkey_top_k == b->subkey_top_k && a->shared_keys == b->shared_keys &&
         a->activation == b->activation && a->gate == b->gate && a->query_norm == b->query_norm &&
         a->query_bias == b->query_bias && a->weight_dtype == b->weight_dtype;
}

Test(config, defaults_match_the_header) {
  peer_config c;
  memset(&c, 0x5a, sizeof c);
  peer_config_default(&c);
  cr_assert_eq(c.d_model, 512);
  cr_assert_eq(c.n_heads, 8);
  cr_assert_eq(c.d_key, 256);
  cr_assert_eq(c.n_subkeys, 1024);
  cr_assert_eq(c.top_k, 16);
  cr_assert_eq(c.subkey_top_k, 0);
  cr_assert_eq(c.shared_keys, 0);
  cr_assert_eq(c.activation, PEER_ACT_GELU);
  cr_assert_eq(c.gate, PEER_GATE_SOFTMAX);
  cr_assert_eq(c.query_norm, PEER_NORM_NONE);
  cr_assert_eq(c.query_bias, 0);
  cr_assert_eq(c.weight_dtype, PEER_F32);
  cr_assert_eq(peer_config_subkey_top_k(&c), 16);
  cr_assert_eq(peer_config_n_experts(&c), 1048576);
  cr_assert_eq(peer_config_validate(&c), PEER_OK, "%s", peer_last_error());
  peer_options o;
  memset(&o, 0x5a, sizeof o);
  peer_options_default(&o);
  cr_assert_eq(o.backend, PEER_BACKEND_CPU);
  cr_assert_eq(o.n_threads, 0);
  cr_assert_eq(o.device, 0);
}

Test(config, parse_sets_every_key) {
  peer_config c;
  peer_config_default(&c);
  cr_assert_eq(peer_config_parse(&c, "d_model=96,n_heads=3,d_key=10,n_subkeys=77,top_k=5,"
                                     "subkey_top_k=9,shared_keys=1,activation=silu,gate=relu,"
                                     "query_norm=batchnorm,query_bias=1,weight_dtype=bf16"),
               PEER_OK, "%s", peer_last_error());
  cr_assert_eq(c.d_model, 96);
  cr_assert_eq(c.n_heads, 3);
  cr_assert_eq(c.d_key, 10);
  cr_assert_eq(c.n_subkeys, 77);
  cr_assert_eq(c.top_k, 5);
  cr_assert_eq(c.subkey_top_k, 9);
  cr_assert_eq(c.shared_keys, 1);
  cr_assert_eq(c.activation, PEER_ACT_SILU);
  cr_assert_eq(c.gate, PEER_GATE_RELU);
  cr_assert_eq(c.query_norm, PEER_NORM_BATCHNORM);
  cr_assert_eq(c.query_bias, 1);
  cr_assert_eq(c.weight_dtype, PEER_BF16);
  cr_assert_eq(peer_config_subkey_top_k(&c), 9);
  cr_assert_eq(peer_config_n_experts(&c), 77 * 77);
  cr_assert_eq(peer_config_validate(&c), PEER_OK, "%s", peer_last_error());

  /* every enum value by name, applied on top of what is there */
  const char *acts[] = {"relu", "gelu", "gelu_tanh", "silu", "identity"};
  for (int i = 0; i < 5; i++) {
    char text[64];
    snprintf(text, sizeof text, "activation=%s", acts[i]);
    cr_assert_eq(peer_config_parse(&c, text), PEER_OK, "%s", text);
    cr_assert_eq((int)c.activation, i, "%s", text);
    cr_assert_str_eq(peer_activation_name((peer_activation)i), acts[i]);
  }
  const char *gates[] = {"softmax", "sigmoid", "relu"};
  for (int i = 0; i < 3; i++) {
    char text[64];
    snprintf(text, sizeof text, "gate=%s", gates[i]);
    cr_assert_eq(peer_config_parse(&c, text), PEER_OK, "%s", text);
    cr_assert_eq((int)c.gate, i, "%s", text);
    cr_assert_str_eq(peer_gate_name((peer_gate)i), gates[i]);
  }
  cr_assert_eq(peer_config_parse(&c, "query_norm=none,shared_keys=0,query_bias=0"), PEER_OK);
  cr_assert_eq(c.query_norm, PEER_NORM_NONE);
  cr_assert_eq(c.shared_keys, 0);
  cr_assert_eq(c.query_bias, 0);
  cr_assert_str_eq(peer_query_norm_name(PEER_NORM_NONE), "none");
  cr_assert_str_eq(peer_query_norm_name(PEER_NORM_BATCHNORM), "batchnorm");
  cr_assert_eq(peer_config_parse(&c, "weight_dtype=f32"), PEER_OK);
  cr_assert_eq(c.weight_dtype, PEER_F32);
  /* keys not named keep their values; an empty string changes nothing */
  peer_config before = c;
  cr_assert_eq(peer_config_parse(&c, ""), PEER_OK);
  cr_assert(same_config(&c, &before));
  cr_assert_eq(peer_config_parse(&c, "top_k=4"), PEER_OK);
  before.top_k = 4;
  cr_assert(same_config(&c, &before));
}

Test(config, enum_names_and_sizes) {
  cr_assert_str_eq(peer_dtype_name(PEER_F32), "F32");
  cr_assert_str_eq(peer_dtype_name(PEER_BF16), "BF16");
  cr_assert_str_eq(peer_dtype_name(PEER_I64), "I64");
  cr_assert_eq(peer_dtype_size(PEER_F32), 4);
  cr_assert_eq(peer_dtype_size(PEER_BF16), 2);
  cr_assert_eq(peer_dtype_size(PEER_I64), 8);
  cr_assert_eq(peer_version_number(), PEER_VERSION_NUMBER);
  char v[32];
  snprintf(v, sizeof v, "%d.%d.%d", PEER_VERSION_MAJOR, PEER_VERSION_MINOR, PEER_VERSION_PATCH);
  cr_assert_str_eq(peer_version_string(), v);
}

/* A parse that must fail with PEER_ERR_CONFIG, name `field` in its message
 * and leave the config as it was. */
static void expect_parse_error(const char *text, const char *field) {
  peer_config c, before;
  peer_config_default(&c);
  c.d_model = 33; /* not a default, to see that nothing is reset either */
  before = c;
  peer_status st = peer_config_parse(&c, text);
  cr_assert_eq(st, PEER_ERR_CONFIG, "'%s': status %d", text, (int)st);
  cr_assert(strstr(peer_last_error(), field) != NULL, "'%s': message '%s' does not name '%s'", text,
            peer_last_error(), field);
  cr_assert(same_config(&c, &before), "'%s' changed the config although it failed", text);
}

Test(config, parse_accepts_blanks_around_items) {
  peer_config c;
  peer_config_default(&c);
  cr_assert_eq(peer_config_parse(&c, "n_subkeys=64, top_k=8 ,\tgate = relu, "), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(c.n_subkeys, 64);
  cr_assert_eq(c.top_k, 8);
  cr_assert_eq(c.gate, PEER_GATE_RELU);
  expect_parse_error("top_k=8, colour=blue", "colour");
  expect_parse_error("top_k=8 9", "top_k");
}

Test(config, parse_rejects_bad_text) {
  expect_parse_error("colour=blue", "colour");
  expect_parse_error("d_model=64,colour=blue", "colour"); /* earlier item not applied */
  expect_parse_error("activation=tanh", "activation");
  expect_parse_error("activation=GELU", "activation");
  expect_parse_error("gate=max", "gate");
  expect_parse_error("query_norm=layernorm", "query_norm");
  expect_parse_error("weight_dtype=f16", "weight_dtype");
  expect_parse_error("weight_dtype=I64", "weight_dtype");
  expect_parse_error("d_model=12x", "d_model");
  expect_parse_error("n_heads=1.5", "n_heads");
  expect_parse_error("d_key=", "d_key");
  expect_parse_error("n_subkeys=ten", "n_subkeys");
  expect_parse_error("top_k=-3", "top_k");
  expect_parse_error("subkey_top_k=-1", "subkey_top_k");
  expect_parse_error("d_model=99999999999999999999999", "d_model");
  expect_parse_error("shared_keys=2", "shared_keys");
  expect_parse_error("query_bias=yes", "query_bias");
  expect_parse_error("n_heads=4,d_model", "d_model");
  expect_parse_error("top_k", "top_k");
  peer_config c;
  peer_config_default(&c);
  cr_assert_eq(peer_config_parse(NULL, "top_k=1"), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_config_parse(&c, NULL), PEER_ERR_INVALID_ARGUMENT);
}

/* A config that validate and layer_create must reject, naming `field`. */
static void expect_invalid(const peer_config *c, const char *field) {
  cr_assert_eq(peer_config_validate(c), PEER_ERR_CONFIG, "config should be invalid (%s)", field);
  cr_assert(strstr(peer_last_error(), field) != NULL, "message '%s' does not name '%s'",
            peer_last_error(), field);
  peer_layer *L = (peer_layer *)&L; /* not NULL: create must clear it */
  cr_assert_eq(peer_layer_create(&L, c, NULL), PEER_ERR_CONFIG, "create accepted a bad %s", field);
  cr_assert_null(L, "create left *out set after failing (%s)", field);
  cr_assert(strstr(peer_last_error(), field) != NULL, "create's message '%s' does not name '%s'",
            peer_last_error(), field);
}

Test(config, validate_rejects_impossible_configs) {
  peer_config base;
  peer_config_default(&base);
  base.d_model = 16, base.n_heads = 2, base.d_key = 8, base.n_subkeys = 8, base.top_k = 4;
  cr_assert_eq(peer_config_validate(&base), PEER_OK, "%s", peer_last_error());
  peer_config c;
  c = base, c.d_key = 7;
  expect_invalid(&c, "d_key");
  c = base, c.d_key = 0;
  expect_invalid(&c, "d_key");
  c = base, c.top_k = 5, c.subkey_top_k = 4;
  expect_invalid(&c, "top_k");
  c = base, c.subkey_top_k = 9;
  expect_invalid(&c, "subkey_top_k");
  c = base, c.top_k = 9; /* k' defaults to k, which exceeds n: a top_k problem */
  expect_invalid(&c, "top_k");
  cr_assert(strncmp(peer_last_error(), "top_k:", 6) == 0, "'%s' does not start with top_k:",
            peer_last_error());
  c = base, c.n_subkeys = 0;
  expect_invalid(&c, "n_subkeys");
  c = base, c.n_subkeys = (int64_t)1 << 20; /* N = 2^40 */
  expect_invalid(&c, "n_subkeys");
  c = base, c.n_subkeys = (int64_t)1 << 33; /* n^2 overflows int64 */
  expect_invalid(&c, "n_subkeys");
  c = base, c.top_k = 0;
  expect_invalid(&c, "top_k");
  c = base, c.d_model = 0;
  expect_invalid(&c, "d_model");
  c = base, c.d_model = -5;
  expect_invalid(&c, "d_model");
  c = base, c.n_heads = 0;
  expect_invalid(&c, "n_heads");
  c = base, c.shared_keys = 2;
  expect_invalid(&c, "shared_keys");
  c = base, c.query_bias = -1;
  expect_invalid(&c, "query_bias");
  c = base, c.activation = (peer_activation)5;
  expect_invalid(&c, "activation");
  c = base, c.gate = (peer_gate)3;
  expect_invalid(&c, "gate");
  c = base, c.query_norm = (peer_query_norm)2;
  expect_invalid(&c, "query_norm");
  c = base, c.weight_dtype = PEER_I64;
  expect_invalid(&c, "weight_dtype");
  cr_assert_eq(peer_config_validate(NULL), PEER_ERR_INVALID_ARGUMENT);
  /* edges that are valid: k = k' = n, n = 1 */
  c = base, c.top_k = 8, c.subkey_top_k = 8;
  cr_assert_eq(peer_config_validate(&c), PEER_OK, "%s", peer_last_error());
  c = base, c.n_subkeys = 1, c.top_k = 1;
  cr_assert_eq(peer_config_validate(&c), PEER_OK, "%s", peer_last_error());
  /* options */
  peer_options o;
  peer_options_default(&o);
  o.n_threads = -1;
  peer_layer *L = (peer_layer *)&L;
  cr_assert_eq(peer_layer_create(&L, &base, &o), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_null(L);
  cr_assert_eq(peer_layer_create(NULL, &base, NULL), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_layer_create(&L, NULL, NULL), PEER_ERR_INVALID_ARGUMENT);
}

Test(config, format_round_trips_through_parse) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  ref_rng rng = {seed};
  for (int i = 0; i < 200; i++) {
    peer_config c;
    peer_config_default(&c);
    c.d_model = ref_int(&rng, 1, 1 << 20);
    c.n_heads = ref_int(&rng, 1, 1024);
    c.d_key = 2 * ref_int(&rng, 1, 4096);
    c.n_subkeys = ref_int(&rng, 1, 65536);
    c.top_k = ref_int(&rng, 1, 64);
    c.subkey_top_k = ref_int(&rng, 0, 1) ? 0 : c.top_k + ref_int(&rng, 0, 64);
    c.shared_keys = (int)ref_int(&rng, 0, 1);
    c.activation = (peer_activation)ref_int(&rng, 0, 4);
    c.gate = (peer_gate)ref_int(&rng, 0, 2);
    c.query_norm = (peer_query_norm)ref_int(&rng, 0, 1);
    c.query_bias = (int)ref_int(&rng, 0, 1);
    c.weight_dtype = ref_int(&rng, 0, 1) ? PEER_BF16 : PEER_F32;
    char buf[512];
    int len = peer_config_format(&c, buf, sizeof buf);
    cr_assert(len > 0 && (size_t)len == strlen(buf), "format returned %d for '%s'", len, buf);
    char small[8];
    cr_assert_eq(peer_config_format(&c, small, sizeof small), len, "needed length");
    cr_assert_eq(strlen(small), sizeof small - 1);
    peer_config back;
    peer_config_default(&back);
    back.d_model = 1, back.query_bias = 1 - c.query_bias, back.gate = (peer_gate)((c.gate + 1) % 3);
    cr_assert_eq(peer_config_parse(&back, buf), PEER_OK, "'%s': %s", buf, peer_last_error());
    cr_assert_eq(peer_config_subkey_top_k(&back), peer_config_subkey_top_k(&c), "'%s'", buf);
    back.subkey_top_k = c.subkey_top_k; /* format writes the k' in effect */
    cr_assert(same_config(&back, &c), "'%s' did not round-trip", buf);
    /* every key is written */
    const char *keys[] = {
        "d_model=",     "n_heads=",    "d_key=", "n_subkeys=",  "top_k=",      "subkey_top_k=",
        "shared_keys=", "activation=", "gate=",  "query_norm=", "query_bias=", "weight_dtype="};
    for (int j = 0; j < 12; j++) cr_assert(strstr(buf, keys[j]), "'%s' lacks %s", buf, keys[j]);
  }
}

Test(config, status_strings) {
  for (int s = 0; s <= 11; s++) {
    const char *a = peer_status_string((peer_status)s);
    cr_assert(a != NULL && a[0] != '\0', "status %d has no name", s);
    for (int t = 0; t < s; t++)
      cr_assert_str_neq(a, peer_status_string((peer_status)t), "statuses %d and %d share '%s'", s,
                        t, a);
  }
  const char *u = peer_status_string((peer_status)99);
  cr_assert(u != NULL && u[0] != '\0');
}

typedef struct expected_param {
  const char *name;
  peer_dtype dtype;
  int ndim;
  int64_t shape[4];
} expected_param;

static void check_params(peer_layer *L, const expected_param *want, int n_want,
                         const char *const *absent, int n_absent) {
  cr_assert_eq(peer_layer_n_params(L), n_want);
  int seen[16] = {0};
  for (int i = 0; i < n_want; i++) {
    peer_tensor t;
    cr_assert_eq(peer_layer_param(L, i, &t), PEER_OK);
    int w = -1;
    for (int j = 0; j < n_want; j++)
      if (strcmp(t.name, want[j].name) == 0) w = j;
    cr_assert_geq(w, 0, "unexpected parameter '%s'", t.name);
    cr_assert_eq(seen[w]++, 0, "'%s' listed twice", t.name);
    cr_assert_eq(t.dtype, want[w].dtype, "%s dtype", t.name);
    cr_assert_eq(t.ndim, want[w].ndim, "%s ndim", t.name);
    size_t count = 1;
    for (int k = 0; k < t.ndim; k++) {
      cr_assert_eq(t.shape[k], want[w].shape[k], "%s shape[%d] = %lld, want %lld", t.name, k,
                   (long long)t.shape[k], (long long)want[w].shape[k]);
      count *= (size_t)t.shape[k];
    }
    cr_assert_eq(t.nbytes, count * peer_dtype_size(t.dtype), "%s nbytes", t.name);
    cr_assert_not_null(t.data, "%s data", t.name);
    peer_tensor u;
    cr_assert_eq(peer_layer_param_by_name(L, want[w].name, &u), PEER_OK);
    cr_assert(u.data == t.data && u.nbytes == t.nbytes);
  }
  for (int j = 0; j < n_absent; j++) {
    peer_tensor t;
    cr_assert_eq(peer_layer_param_by_name(L, absent[j], &t), PEER_ERR_INVALID_ARGUMENT,
                 "layer has '%s' it should not", absent[j]);
  }
  peer_tensor t;
  cr_assert_eq(peer_layer_param(L, n_want, &t), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_layer_param(L, -1, &t), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_layer_param(L, 0, NULL), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_layer_param_by_name(L, NULL, &t), PEER_ERR_INVALID_ARGUMENT);
}

Test(config, parameter_listing_follows_peer_md) {
  peer_config c;
  peer_config_default(&c);
  c.d_model = 12, c.n_heads = 3, c.d_key = 6, c.n_subkeys = 5, c.top_k = 2;
  peer_layer *L;
  cr_assert_eq(peer_layer_create(&L, &c, NULL), PEER_OK, "%s", peer_last_error());
  const expected_param plain[] = {
      {"query.weight", PEER_F32, 2, {18, 12}},
      {"keys", PEER_F32, 4, {3, 2, 5, 3}},
      {"experts.down", PEER_F32, 2, {25, 12}},
      {"experts.up", PEER_F32, 2, {25, 12}},
  };
  const char *absent[] = {"query.bias",
                          "query.norm.weight",
                          "query.norm.bias",
                          "query.norm.running_mean",
                          "query.norm.running_var",
                          "nonsense"};
  check_params(L, plain, 4, absent, 6);
  cr_assert_eq(peer_layer_config(L)->d_model, 12);
  /* a fresh layer's parameters are zero (norm statistics aside) */
  peer_tensor t;
  cr_assert_eq(peer_layer_param_by_name(L, "experts.up", &t), PEER_OK);
  for (int64_t i = 0; i < 25 * 12; i++) cr_assert_eq(((float *)t.data)[i], 0.0f);
  peer_layer_free(L);

  c.query_bias = 1, c.query_norm = PEER_NORM_BATCHNORM, c.shared_keys = 1;
  c.weight_dtype = PEER_BF16;
  cr_assert_eq(peer_layer_create(&L, &c, NULL), PEER_OK, "%s", peer_last_error());
  const expected_param full[] = {
      {"query.weight", PEER_F32, 2, {18, 12}},
      {"query.bias", PEER_F32, 1, {18}},
      {"query.norm.weight", PEER_F32, 1, {18}},
      {"query.norm.bias", PEER_F32, 1, {18}},
      {"query.norm.running_mean", PEER_F32, 1, {18}},
      {"query.norm.running_var", PEER_F32, 1, {18}},
      {"keys", PEER_F32, 4, {1, 2, 5, 3}},
      {"experts.down", PEER_BF16, 2, {25, 12}},
      {"experts.up", PEER_BF16, 2, {25, 12}},
  };
  check_params(L, full, 9, absent + 5, 1);
  peer_layer_free(L);
}

/* Counts worked out by hand from PEER.md's shapes. */
Test(config, parameter_counts) {
  peer_config c;
  peer_config_default(&c);
  c.d_model = 12, c.n_heads = 3, c.d_key = 6, c.n_subkeys = 5, c.top_k = 2;
  peer_layer *L;
  cr_assert_eq(peer_layer_create(&L, &c, NULL), PEER_OK);
  /* Wq 18*12 = 216, keys 3*2*5*3 = 90, experts 2*25*12 = 600 */
  cr_assert_eq(peer_layer_n_parameters(L), 216 + 90 + 600);
  /* active: Wq, keys, and 2 * H*k = 12 expert rows of 12 */
  cr_assert_eq(peer_layer_n_active_parameters(L), 216 + 90 + 2 * 3 * 2 * 12);
  peer_layer_free(L);
  c.query_bias = 1, c.query_norm = PEER_NORM_BATCHNORM, c.shared_keys = 1;
  c.weight_dtype = PEER_BF16;
  cr_assert_eq(peer_layer_create(&L, &c, NULL), PEER_OK);
  /* + bias 18 + norm 4*18 = 72; keys 1*2*5*3 = 30 */
  cr_assert_eq(peer_layer_n_parameters(L), 216 + 18 + 72 + 30 + 600);
  cr_assert_eq(peer_layer_n_active_parameters(L), 216 + 18 + 72 + 30 + 144);
  peer_layer_free(L);
  /* the paper's widths with n = 128 (N = 16384) to keep the tables small */
  peer_config_default(&c);
  c.n_subkeys = 128;
  cr_assert_eq(peer_layer_create(&L, &c, NULL), PEER_OK, "%s", peer_last_error());
  int64_t wq = 2048LL * 512, keys = 8LL * 2 * 128 * 128, experts = 2LL * 16384 * 512;
  cr_assert_eq(peer_layer_n_parameters(L), wq + keys + experts);
  cr_assert_eq(peer_layer_n_active_parameters(L), wq + keys + 2LL * 8 * 16 * 512);
  peer_layer_free(L);
  cr_assert_eq(peer_layer_n_parameters(NULL), 0);
}

static void *param_copy(peer_layer *L, int i, size_t *bytes) {
  peer_tensor t;
  cr_assert_eq(peer_layer_param(L, i, &t), PEER_OK);
  void *p = malloc(t.nbytes);
  memcpy(p, t.data, t.nbytes);
  *bytes = t.nbytes;
  return p;
}

Test(config, init_is_seeded_and_thread_independent) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  peer_config c;
  peer_config_default(&c);
  c.d_model = 40, c.n_heads = 3, c.d_key = 12, c.n_subkeys = 30, c.top_k = 4;
  c.query_bias = 1, c.query_norm = PEER_NORM_BATCHNORM;
  for (int bf16 = 0; bf16 < 2; bf16++) {
    c.weight_dtype = bf16 ? PEER_BF16 : PEER_F32;
    peer_options o1, o3;
    peer_options_default(&o1);
    peer_options_default(&o3);
    o1.n_threads = 1, o3.n_threads = 3;
    peer_layer *A, *B, *D;
    cr_assert_eq(peer_layer_create(&A, &c, &o1), PEER_OK);
    cr_assert_eq(peer_layer_create(&B, &c, &o3), PEER_OK);
    cr_assert_eq(peer_layer_create(&D, &c, &o1), PEER_OK);
    cr_assert_eq(peer_layer_init(A, seed), PEER_OK);
    cr_assert_eq(peer_layer_init(B, seed), PEER_OK);
    cr_assert_eq(peer_layer_init(D, seed + 1), PEER_OK);
    for (int i = 0; i < peer_layer_n_params(A); i++) {
      size_t na, nb, nd;
      void *a = param_copy(A, i, &na), *b = param_copy(B, i, &nb), *d = param_copy(D, i, &nd);
      peer_tensor t;
      peer_layer_param(A, i, &t);
      cr_assert(na == nb && memcmp(a, b, na) == 0,
                "seed=%llu %s: 1 and 3 threads initialise different bits", (unsigned long long)seed,
                t.name);
      int random = strcmp(t.name, "query.weight") == 0 || strcmp(t.name, "keys") == 0 ||
                   strncmp(t.name, "experts.", 8) == 0;
      /* random parameters differ between seeds, constant ones do not */
      cr_assert((memcmp(a, d, na) != 0) == random, "seed=%llu %s: seeds s and s+1 give %s values",
                (unsigned long long)seed, t.name, random ? "the same" : "different");
      free(a);
      free(b);
      free(d);
    }
    /* a second init with the same seed on a used layer gives the same bits */
    cr_assert_eq(peer_layer_init(D, seed), PEER_OK);
    for (int i = 0; i < peer_layer_n_params(A); i++) {
      peer_tensor ta, td;
      peer_layer_param(A, i, &ta);
      peer_layer_param(D, i, &td);
      cr_assert(memcmp(ta.data, td.data, ta.nbytes) == 0, "re-init %s", ta.name);
    }
    peer_layer_free(A);
    peer_layer_free(B);
    peer_layer_free(D);
  }
  cr_assert_eq(peer_layer_init(NULL, 1), PEER_ERR_INVALID_ARGUMENT);
}

/* Values of one parameter: all inside [-a, a] (bf16 rounding may reach a
 * hair past), mean near 0 and variance near a^2/3 (U(-a, a)). */
static void check_uniform(peer_layer *L, const char *name, double a) {
  peer_tensor t;
  int64_t n = ref_param_count(L, name, &t);
  cr_assert_gt(n, 0, "%s", name);
  double s = 0.0, s2 = 0.0, bound = a * (t.dtype == PEER_BF16 ? 1.0 + 1.0 / 256 : 1.0);
  for (int64_t i = 0; i < n; i++) {
    double v = t.dtype == PEER_BF16 ? (double)ref_bf16_to_float(((uint16_t *)t.data)[i])
                                    : (double)((float *)t.data)[i];
    cr_assert(fabs(v) <= bound, "%s[%lld] = %g outside +-%g", name, (long long)i, v, a);
    s += v;
    s2 += v * v;
  }
  double mean = s / (double)n, var = s2 / (double)n - mean * mean, want = a * a / 3.0;
  /* sd of the mean: a / sqrt(3n); of the variance: about 0.9 * want / sqrt(n) */
  cr_assert(fabs(mean) < 6.0 * a / sqrt(3.0 * (double)n), "%s: mean %g (a %g, n %lld)", name, mean,
            a, (long long)n);
  cr_assert(fabs(var - want) < 6.0 * 0.9 * want / sqrt((double)n),
            "%s: variance %g, U(-a, a) gives %g", name, var, want);
}

static void check_constant(peer_layer *L, const char *name, float v) {
  peer_tensor t;
  int64_t n = ref_param_count(L, name, &t);
  cr_assert_gt(n, 0, "%s", name);
  for (int64_t i = 0; i < n; i++)
    cr_assert_eq(((float *)t.data)[i], v, "%s[%lld] = %g, want %g", name, (long long)i,
                 (double)((float *)t.data)[i], (double)v);
}

Test(config, init_distributions_follow_the_header) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  peer_config c;
  peer_config_default(&c);
  c.d_model = 64, c.n_heads = 4, c.d_key = 18, c.n_subkeys = 40, c.top_k = 3;
  c.query_bias = 1, c.query_norm = PEER_NORM_BATCHNORM;
  for (int bf16 = 0; bf16 < 2; bf16++) {
    c.weight_dtype = bf16 ? PEER_BF16 : PEER_F32;
    peer_layer *L;
    cr_assert_eq(peer_layer_create(&L, &c, NULL), PEER_OK);
    /* poison the constant ones to see init set them */
    ref_rng rng = {seed};
    ref_fill_uniform(L, "query.bias", &rng, 3.0, 4.0);
    ref_fill_uniform(L, "query.norm.weight", &rng, 3.0, 4.0);
    ref_fill_uniform(L, "query.norm.bias", &rng, 3.0, 4.0);
    ref_fill_uniform(L, "query.norm.running_mean", &rng, 3.0, 4.0);
    ref_fill_uniform(L, "query.norm.running_var", &rng, 3.0, 4.0);
    cr_assert_eq(peer_layer_init(L, seed), PEER_OK);
    check_uniform(L, "query.weight", 1.0 / sqrt(64.0));
    check_uniform(L, "keys", 1.0 / sqrt(9.0));
    check_uniform(L, "experts.down", 1.0 / sqrt(64.0));
    check_uniform(L, "experts.up", 1.0 / sqrt(12.0));
    check_constant(L, "query.bias", 0.0f);
    check_constant(L, "query.norm.weight", 1.0f);
    check_constant(L, "query.norm.bias", 0.0f);
    check_constant(L, "query.norm.running_mean", 0.0f);
    check_constant(L, "query.norm.running_var", 1.0f);
    peer_layer_free(L);
  }
}

/* ----------------------------------------------------------------- metrics */

Test(metrics, bad_arguments_are_named) {
  double z[4] = {1, 0, 0, 0}, usage, uneven;
  int64_t ids[1] = {0};
  float gates[1] = {1.0f};
  cr_assert_eq(peer_usage_metrics(z, 0, &usage, &uneven), PEER_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(peer_last_error(), "n_experts is 0"), "%s", peer_last_error());
  cr_assert_eq(peer_usage_metrics(NULL, 4, &usage, &uneven), PEER_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(peer_last_error(), "z is NULL"), "%s", peer_last_error());
  cr_assert_eq(peer_usage_metrics(z, 4, &usage, NULL), PEER_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(peer_last_error(), "unevenness is NULL"), "%s", peer_last_error());
  cr_assert_eq(peer_usage_accumulate(z, 4, NULL, gates, 1), PEER_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(peer_last_error(), "indices is NULL"), "%s", peer_last_error());
  cr_assert_eq(peer_usage_accumulate(z, 4, ids, gates, -1), PEER_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(peer_last_error(), "n_entries is -1"), "%s", peer_last_error());
}

Test(metrics, uniform_mass_is_full_usage_and_even) {
  double z[100];
  for (int i = 0; i < 100; i++) z[i] = 0.37;
  double usage = -1, uneven = -1;
  cr_assert_eq(peer_usage_metrics(z, 100, &usage, &uneven), PEER_OK, "%s", peer_last_error());
  cr_assert_float_eq(usage, 1.0, 1e-15);
  cr_assert_float_eq(uneven, 0.0, 1e-12);
}

Test(metrics, one_expert_is_log_n) {
  double z[64] = {0};
  z[17] = 5.0;
  double usage = -1, uneven = -1;
  cr_assert_eq(peer_usage_metrics(z, 64, &usage, &uneven), PEER_OK);
  cr_assert_float_eq(usage, 1.0 / 64, 1e-15);
  cr_assert_float_eq(uneven, log(64.0), 1e-12);
}

Test(metrics, three_experts_by_hand) {
  /* z = (1, 2, 0): usage 2/3; p = (1/3, 2/3):
   * log 3 + 1/3 log(1/3) + 2/3 log(2/3) = 1.0986122887 - 0.3662040962
   * - 0.2703100721 = 0.4620981204 */
  double z[3] = {1.0, 2.0, 0.0};
  double usage = -1, uneven = -1;
  cr_assert_eq(peer_usage_metrics(z, 3, &usage, &uneven), PEER_OK);
  cr_assert_float_eq(usage, 2.0 / 3.0, 1e-15);
  cr_assert_float_eq(uneven, 0.4620981204, 1e-9);
  /* scale does not matter */
  double z2[3] = {1e-3, 2e-3, 0.0};
  cr_assert_eq(peer_usage_metrics(z2, 3, &usage, &uneven), PEER_OK);
  cr_assert_float_eq(uneven, 0.4620981204, 1e-9);
}

Test(metrics, accumulate_adds_gates_per_expert) {
  double z[4] = {0.0, 0.0, 0.0, 1.5}; /* existing mass is kept */
  const int64_t ids[5] = {0, 2, 2, 1, 0};
  const float g[5] = {0.5f, 0.25f, 0.25f, 1.0f, 0.125f};
  cr_assert_eq(peer_usage_accumulate(z, 4, ids, g, 5), PEER_OK, "%s", peer_last_error());
  cr_assert_float_eq(z[0], 0.625, 1e-15);
  cr_assert_float_eq(z[1], 1.0, 1e-15);
  cr_assert_float_eq(z[2], 0.5, 1e-15);
  cr_assert_float_eq(z[3], 1.5, 1e-15);
  double usage, uneven;
  cr_assert_eq(peer_usage_metrics(z, 4, &usage, &uneven), PEER_OK);
  cr_assert_float_eq(usage, 1.0, 1e-15);
  /* p = (0.625, 1, 0.5, 1.5) / 3.625 */
  double want = log(4.0);
  const double p[4] = {0.625 / 3.625, 1.0 / 3.625, 0.5 / 3.625, 1.5 / 3.625};
  for (int i = 0; i < 4; i++) want += p[i] * log(p[i]);
  cr_assert_float_eq(uneven, want, 1e-12);
  cr_assert_eq(peer_usage_accumulate(z, 4, ids, g, 0), PEER_OK);
  cr_assert_eq(peer_usage_accumulate(z, 4, NULL, NULL, 0), PEER_OK);
}

Test(metrics, bad_input_is_rejected) {
  double z[3] = {1.0, 2.0, 3.0}, usage, uneven;
  const double before[3] = {1.0, 2.0, 3.0};
  int64_t ids[2] = {0, 3};
  float g[2] = {1.0f, 1.0f};
  /* an out-of-range id or a bad gate anywhere: nothing is added */
  cr_assert_eq(peer_usage_accumulate(z, 3, ids, g, 2), PEER_ERR_INVALID_ARGUMENT);
  ids[1] = -1;
  cr_assert_eq(peer_usage_accumulate(z, 3, ids, g, 2), PEER_ERR_INVALID_ARGUMENT);
  ids[1] = 1, g[1] = -0.5f;
  cr_assert_eq(peer_usage_accumulate(z, 3, ids, g, 2), PEER_ERR_INVALID_ARGUMENT);
  g[1] = NAN;
  cr_assert_eq(peer_usage_accumulate(z, 3, ids, g, 2), PEER_ERR_INVALID_ARGUMENT);
  g[1] = INFINITY;
  cr_assert_eq(peer_usage_accumulate(z, 3, ids, g, 2), PEER_ERR_INVALID_ARGUMENT);
  cr_assert(memcmp(z, before, sizeof z) == 0, "a rejected accumulate changed z");
  g[1] = 1.0f;
  cr_assert_eq(peer_usage_accumulate(NULL, 3, ids, g, 2), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_accumulate(z, 3, NULL, g, 2), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_accumulate(z, 3, ids, NULL, 2), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_accumulate(z, 3, ids, g, -1), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_accumulate(z, 0, ids, g, 2), PEER_ERR_INVALID_ARGUMENT);

  double zero[3] = {0.0, 0.0, 0.0}, neg[3] = {1.0, -1.0, 1.0}, nan3[3] = {1.0, NAN, 1.0};
  double inf3[3] = {1.0, INFINITY, 1.0};
  cr_assert_eq(peer_usage_metrics(zero, 3, &usage, &uneven), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_metrics(neg, 3, &usage, &uneven), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_metrics(nan3, 3, &usage, &uneven), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_metrics(inf3, 3, &usage, &uneven), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_metrics(z, 0, &usage, &uneven), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_metrics(NULL, 3, &usage, &uneven), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_metrics(z, 3, NULL, &uneven), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_usage_metrics(z, 3, &usage, NULL), PEER_ERR_INVALID_ARGUMENT);
  cr_assert(peer_last_error()[0] != '\0');
}

/* Metrics of a real retrieval: usage is the fraction of distinct kept ids,
 * and the mass adds up to the gate total. */
Test(metrics, metrics_of_a_retrieval) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  peer_config c;
  peer_config_default(&c);
  c.d_model = 16, c.n_heads = 2, c.d_key = 8, c.n_subkeys = 6, c.top_k = 3;
  peer_layer *L;
  cr_assert_eq(peer_layer_create(&L, &c, NULL), PEER_OK);
  ref_rng rng = {seed};
  ref_fill_layer(L, &rng);
  const int64_t T = 7, m = T * 2 * 3;
  float *x = ref_random_x(&rng, T, 16), g[42];
  int64_t ids[42];
  cr_assert_eq(peer_retrieve(L, T, x, ids, NULL, g), PEER_OK);
  double z[36] = {0};
  cr_assert_eq(peer_usage_accumulate(z, 36, ids, g, m), PEER_OK);
  int used[36] = {0}, n_used = 0;
  double total = 0.0;
  for (int64_t i = 0; i < m; i++) {
    n_used += !used[ids[i]];
    used[ids[i]] = 1;
    total += g[i];
  }
  double sum = 0.0;
  for (int i = 0; i < 36; i++) sum += z[i];
  cr_assert_float_eq(sum, total, 1e-9);
  cr_assert_float_eq(sum, (double)(T * 2), 1e-5); /* softmax: each head's gates sum to 1 */
  double usage, uneven;
  cr_assert_eq(peer_usage_metrics(z, 36, &usage, &uneven), PEER_OK);
  cr_assert_float_eq(usage, n_used / 36.0, 1e-15);
  cr_assert(uneven >= 0.0 && uneven <= log(36.0) + 1e-12, "unevenness %g", uneven);
  free(x);
  peer_layer_free(L);
}
