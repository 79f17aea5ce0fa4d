/*
 * kiln's onnxruntime CPU kernels as one library (kiln.runtime.native loads it): the ai.kiln domain,
 * registered once and shared by every session, and the callbacks all its ops share.
 *
 *   row_quantize.c  ai.kiln.RowQuantize2, RowQuantizeSmoothed2, RowQuantizeShifted2 (and the first definitions, RowQuantize,
 *                   RowQuantizeSmoothed): the per-row quantiser of int8 graphs
 *   attention.c     ai.kiln.SelfAttention: multi-head self-attention over packed Q, K and V
 *   layer_norm.c    ai.kiln.SkipLayerNorm: bias, residual and LayerNorm in one kernel
 */

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

int kiln_has_parallel_for = 0;

const char *kiln_on_cpu(const OrtCustomOp *op) { (void)op; return NULL; }
int kiln_required(const OrtCustomOp *op, size_t index) { (void)op; (void)index; return REQUIRED; }
int kiln_default_memory(const OrtCustomOp *op, size_t index) { (void)op; (void)index; return DEFAULT_MEMORY; }
int kiln_one(const OrtCustomOp *op) { (void)op; return 1; }
void kiln_destroy_kernel(void *kernel) { free(kernel); }

int kiln_failed(const OrtApi *api, OrtStatus *status) {
  if (status == NULL) return 0;
  api->ReleaseStatus(status);
  return 1;
}

int kiln_input_shape(const OrtApi *api, const OrtValue *value, int64_t dims[16], size_t *rank) {
  OrtTensorTypeAndShapeInfo *info = NULL;
  if (kiln_failed(api, api->GetTensorTypeAndShape(value, &info))) return 1;
  int bad = kiln_failed(api, api->GetDimensionsCount(info, rank)) || *rank == 0 || *rank > 16 ||
            kiln_failed(api, api->GetDimensions(info, dims, *rank));
  api->ReleaseTensorTypeAndShapeInfo(info);
  return bad;
}

KilnIsa kiln_isa(const char *variable) {
  const char *asked = getenv(variable);
  if (asked && strcmp(asked, "plain") == 0) return ISA_PLAIN;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && !(asked && strcmp(asked, "avx2") == 0)) return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
  return ISA_PLAIN;
}

static OrtCustomOpDomain *DOMAIN = NULL; /* made once, shared by every session that registers it */
static OrtStatus *DOMAIN_ERROR = NULL;
static const OrtApi *API = NULL;
static pthread_once_t DOMAIN_ONCE = PTHREAD_ONCE_INIT;

static void make_domain(void) {
  OrtCustomOp *const *lists[] = {kiln_row_quantize_ops, kiln_attention_ops, kiln_layer_norm_ops};
  size_t counts[] = {sizeof(kiln_row_quantize_ops) / sizeof(void *), sizeof(kiln_attention_ops) / sizeof(void *),
                     sizeof(kiln_layer_norm_ops) / sizeof(void *)};
  DOMAIN_ERROR = API->CreateCustomOpDomain("ai.kiln", &DOMAIN);
  for (size_t l = 0; l < sizeof(lists) / sizeof(lists[0]); ++l)
    for (size_t i = 0; DOMAIN_ERROR == NULL && i < counts[l]; ++i) DOMAIN_ERROR = API->CustomOpDomain_Add(DOMAIN, lists[l][i]);
}

/* onnxruntime's entry point for SessionOptions.register_custom_ops_library. */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options,
                                                                    const OrtApiBase *base) {
  const OrtApi *api = base->GetApi(API_VERSION);
  if (api == NULL) return NULL; /* cannot happen: every onnxruntime serves version 1 */
  API = api;
  kiln_has_parallel_for = base->GetApi(PARALLEL_FOR_API_VERSION) != NULL;
  pthread_once(&DOMAIN_ONCE, make_domain);
  if (DOMAIN_ERROR != NULL) return api->CreateStatus(ORT_FAIL, "kiln kernels: the ai.kiln domain was not made");
  return api->AddCustomOpDomain(options, DOMAIN);
}
