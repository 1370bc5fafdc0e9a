/* metrics.c: expert usage and unevenness (PEER.md "Metrics"), the numbers of
 * the paper's Table 2, from gate mass accumulated per expert. */
#include "internal.h"

#include <math.h>

peer_status peer_usage_accumulate(double *z, int64_t n_experts, const int64_t *indices,
                                  const float *gates, int64_t n_entries) {
  if (!z) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "usage_accumulate: z is NULL");
  if (n_experts < 1)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "usage_accumulate: n_experts is %lld (z needs at least one expert)",
                     (long long)n_experts);
  if (n_entries < 0)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "usage_accumulate: n_entries is %lld (< 0)",
                     (long long)n_entries);
  if ((!indices || !gates) && n_entries > 0)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "usage_accumulate: %s is NULL with %lld entries",
                     !indices ? "indices" : "gates", (long long)n_entries);
  for (int64_t i = 0; i < n_entries; i++) {
    if (indices[i] < 0 || indices[i] >= n_experts)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "usage_accumulate: entry %lld has expert id %lld outside [0, %lld)",
                       (long long)i, (long long)indices[i], (long long)n_experts);
    if (!isfinite(gates[i]) || gates[i] < 0.0f)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "usage_accumulate: entry %lld has gate %g (needs finite, >= 0)",
                       (long long)i, (double)gates[i]);
  }
  for (int64_t i = 0; i < n_entries; i++) z[indices[i]] += (double)gates[i];
  return PEER_OK;
}

peer_status peer_usage_metrics(const double *z, int64_t n_experts, double *usage,
                               double *unevenness) {
  if (!z) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "usage_metrics: z is NULL");
  if (n_experts < 1)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "usage_metrics: n_experts is %lld (z needs one gate mass per expert, at "
                     "least one)",
                     (long long)n_experts);
  if (!usage || !unevenness)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "usage_metrics: %s is NULL",
                     !usage ? "usage" : "unevenness");
  double total = 0.0;
  int64_t used = 0;
  for (int64_t i = 0; i < n_experts; i++) {
    if (!isfinite(z[i]) || z[i] < 0.0)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "usage_metrics: z[%lld] = %g (needs finite, >= 0)", (long long)i, z[i]);
    total += z[i];
    used += z[i] > 0.0;
  }
  if (!(total > 0.0))
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "usage_metrics: no gate mass (sum of z is 0)");
  double plogp = 0.0;
  for (int64_t i = 0; i < n_experts; i++) {
    if (z[i] > 0.0) {
      double p = z[i] / total;
      plogp += p * log(p);
    }
  }
  *usage = (double)used / (double)n_experts;
  *unevenness = log((double)n_experts) + plogp;
  return PEER_OK;
}
