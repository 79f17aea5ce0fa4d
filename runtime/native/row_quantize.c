/*
 * kiln's per-row quantiser as one onnxruntime CPU kernel (kiln.runtime.native loads it).
 *
 * kiln's int8 graphs quantise each activation row with its own scale (kiln.export.rowwise_int8):
 *
 *     xs   = x * unsmooth                      (only where the input's channels were smoothed)
 *     peak = ReduceMax(Abs(xs), axis -1)
 *     q    = QuantizeLinear(xs / peak, 1/127, 128)
 *
 * In standard ops that is four or five kernels, each paying onnxruntime's fixed cost per kernel on a
 * text of a few dozen tokens. The graph declares the steps as one op, ai.kiln.RowQuantize (or
 * RowQuantizeSmoothed), defined as an ONNX function of exactly those standard ops: without this
 * library onnxruntime inlines the function; with it, this kernel runs them in one pass per row. The
 * kernel does the same IEEE operations in the same order (a float multiply, |x|, the max, two
 * correctly rounded divisions, MLAS's clamp to [-128, 127] that maps NaN to -128, round half to
 * even, + 128), so its codes and peaks are the same bits as the function's, which the tests check.
 *
 * onnxruntime's C ABI is declared here in part, from its onnxruntime_c_api.h: OrtApi is a table of
 * function pointers that only ever grows at its end, so the positions of these early entries
 * (API version 1) hold in every release since 1.0. The custom op uses the version-1 layout.
 */

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;

enum { ELEMENT_FLOAT = 1, ELEMENT_UINT8 = 2 }; /* ONNXTensorElementDataType */
enum { ORT_FAIL = 1 };                       /* OrtErrorCode */
enum { REQUIRED = 0, DEFAULT_MEMORY = 0 };   /* OrtCustomOpInputOutputCharacteristic, OrtMemType */
#define API_VERSION 1

typedef struct OrtApi {
  OrtStatus *(*CreateStatus)(int code, const char *message); /* 0 */
  void *unused_1_25[25];
  OrtStatus *(*CreateCustomOpDomain)(const char *domain, OrtCustomOpDomain **out);       /* 26 */
  OrtStatus *(*CustomOpDomain_Add)(OrtCustomOpDomain *domain, const void *op);            /* 27 */
  OrtStatus *(*AddCustomOpDomain)(OrtSessionOptions *options, OrtCustomOpDomain *domain); /* 28 */
  void *unused_29_50[22];
  OrtStatus *(*GetTensorMutableData)(OrtValue *value, void **out); /* 51 */
  void *unused_52_60[9];
  OrtStatus *(*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);           /* 61 */
  OrtStatus *(*GetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t count); /* 62 */
  void *unused_63_64[2];
  OrtStatus *(*GetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out); /* 65 */
  void *unused_66_89[24];
  OrtStatus *(*KernelContext_GetInput)(const OrtKernelContext *context, size_t index, const OrtValue **out); /* 90 */
  OrtStatus *(*KernelContext_GetOutput)(OrtKernelContext *context, size_t index, const int64_t *dims, size_t count,
                                        OrtValue **out); /* 91 */
  void *unused_92;
  void (*ReleaseStatus)(OrtStatus *status); /* 93 */
  void *unused_94_98[5];
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info); /* 99 */
} OrtApi;

_Static_assert(offsetof(OrtApi, CreateCustomOpDomain) == 26 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, GetTensorMutableData) == 51 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, GetDimensionsCount) == 61 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, GetTensorTypeAndShape) == 65 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, KernelContext_GetInput) == 90 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, ReleaseStatus) == 93 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, ReleaseTensorTypeAndShapeInfo) == 99 * sizeof(void *), "OrtApi layout");

typedef struct OrtApiBase {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

/* The whole struct as onnxruntime reads it today: it calls GetInputCharacteristic whatever the version
   says, so every field is here; the op declares version 1, so onnxruntime uses the version-1 kernel
   callbacks and treats the later fields as absent where it checks. */
typedef struct OrtCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
  const char *(*GetName)(const struct OrtCustomOp *op);
  const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
  int (*GetInputType)(const struct OrtCustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
  int (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
  void (*KernelCompute)(void *kernel, OrtKernelContext *context);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);  /* version 8 */
  int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index); /* version 8 */
  int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);      /* version 13 */
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);              /* version 14 */
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
  void *CreateKernelV2;     /* version 16 */
  void *KernelComputeV2;    /* version 16 */
  void *InferOutputShapeFn; /* version 17 */
  void *GetStartVersion;    /* version 17 */
  void *GetEndVersion;      /* version 17 */
  void *GetMayInplace;      /* version 18 */
  void *ReleaseMayInplace;  /* version 18 */
  void *GetAliasMap;        /* version 20 */
  void *ReleaseAliasMap;    /* version 20 */
} OrtCustomOp;

/* One op: its name, and whether it takes the per-channel factors (input 1). */
typedef struct RowOp {
  OrtCustomOp base; /* first, so an OrtCustomOp* is a RowOp* */
  const char *name;
  int smoothed;
} RowOp;

typedef void (*RowFn)(const float *, const float *, float *, int64_t, uint8_t *, float *);

typedef struct Kernel {
  const OrtApi *api;
  int smoothed;
  RowFn row; /* the widest instructions this CPU has */
} Kernel;

static const float PER_LEVEL = 1.0f / 127.0f; /* QuantizeLinear's scale, as the function's constant */

/* The last step for one value, as MLAS's QuantizeLinear does it: divide, clamp to [-128, 127]
   (MAXPS(v, -128): a NaN, an all-zero row's 0 / 0, becomes -128), round half to even, + 128. */
static inline uint8_t code(float xs, float peak) {
  float v = (xs / peak) / PER_LEVEL;
  v = v > -128.0f ? v : -128.0f;
  v = v < 127.0f ? v : 127.0f;
  return (uint8_t)(lrintf(v) + 128);
}

/* The smoothed values xs[i..k) and the largest |xs| of them and `peak`: the vector forms' tails. */
static float peak_from(const float *x, const float *unsmooth, float *xs, int64_t i, int64_t k, float peak) {
  for (; i < k; ++i) {
    xs[i] = unsmooth ? x[i] * unsmooth[i] : x[i];
    float a = fabsf(xs[i]);
    peak = a > peak ? a : peak;
  }
  return peak;
}

/* One row, portably: what Mul, Abs, ReduceMax, Div and QuantizeLinear compute, in their order. */
static void quantize_row_plain(const float *x, const float *unsmooth, float *xs, int64_t k, uint8_t *q, float *peak_out) {
  float peak = peak_from(x, unsmooth, xs, 0, k, -INFINITY);
  *peak_out = peak;
  for (int64_t i = 0; i < k; ++i) q[i] = code(xs[i], peak);
}

#if defined(__x86_64__)
#include <immintrin.h>

/* The same with AVX-512: 16 lanes, the same IEEE operations (vdivps is correctly rounded, vcvtps2dq
   rounds half to even), the codes narrowed by vpmovusdb. */
__attribute__((target("avx512f"))) static void quantize_row_avx512(const float *x, const float *unsmooth, float *xs,
                                                                   int64_t k, uint8_t *q, float *peak_out) {
  __m512 peaks = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    if (unsmooth) v = _mm512_mul_ps(v, _mm512_loadu_ps(unsmooth + i));
    _mm512_storeu_ps(xs + i, v);
    peaks = _mm512_max_ps(_mm512_abs_ps(v), peaks);
  }
  float peak = peak_from(x, unsmooth, xs, i, k, _mm512_reduce_max_ps(peaks));
  *peak_out = peak;
  const __m512 p = _mm512_set1_ps(peak), per_level = _mm512_set1_ps(PER_LEVEL);
  const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  const __m512i zero_point = _mm512_set1_epi32(128);
  for (i = 0; i + 16 <= k; i += 16) {
    __m512 v = _mm512_div_ps(_mm512_div_ps(_mm512_loadu_ps(xs + i), p), per_level);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi); /* max(NaN, lo) is lo */
    __m512i codes = _mm512_add_epi32(_mm512_cvtps_epi32(v), zero_point);
    _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtusepi32_epi8(codes));
  }
  for (; i < k; ++i) q[i] = code(xs[i], peak);
}

/* AVX2: 8 lanes; 32 codes at a time narrowed by two packs and a lane fix-up. */
__attribute__((target("avx2"))) static void quantize_row_avx2(const float *x, const float *unsmooth, float *xs,
                                                              int64_t k, uint8_t *q, float *peak_out) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 peaks = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (unsmooth) v = _mm256_mul_ps(v, _mm256_loadu_ps(unsmooth + i));
    _mm256_storeu_ps(xs + i, v);
    peaks = _mm256_max_ps(_mm256_and_ps(v, sign), peaks);
  }
  float lanes[8], peak = -INFINITY;
  _mm256_storeu_ps(lanes, peaks);
  for (int j = 0; j < 8; ++j) peak = lanes[j] > peak ? lanes[j] : peak;
  peak = peak_from(x, unsmooth, xs, i, k, peak);
  *peak_out = peak;
  const __m256 p = _mm256_set1_ps(peak), per_level = _mm256_set1_ps(PER_LEVEL);
  const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i zero_point = _mm256_set1_epi32(128), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i codes[4];
  for (i = 0; i + 32 <= k; i += 32) {
    for (int j = 0; j < 4; ++j) {
      __m256 v = _mm256_div_ps(_mm256_div_ps(_mm256_loadu_ps(xs + i + 8 * j), p), per_level);
      v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
      codes[j] = _mm256_add_epi32(_mm256_cvtps_epi32(v), zero_point);
    }
    __m256i words = _mm256_packus_epi16(_mm256_packus_epi32(codes[0], codes[1]), _mm256_packus_epi32(codes[2], codes[3]));
    _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(words, order));
  }
  for (; i < k; ++i) q[i] = code(xs[i], peak);
}
#endif

/* The widest form this CPU runs; KILN_ROW_QUANTIZE_ISA=avx2|plain asks for a narrower one, so the
   tests check every form a machine has against the standard ops. */
static RowFn row_function(void) {
  const char *asked = getenv("KILN_ROW_QUANTIZE_ISA");
  if (asked && strcmp(asked, "plain") == 0) return quantize_row_plain;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && !(asked && strcmp(asked, "avx2") == 0)) return quantize_row_avx512;
  if (__builtin_cpu_supports("avx2")) return quantize_row_avx2;
#endif
  return quantize_row_plain;
}

static int failed(const OrtApi *api, OrtStatus *status) {
  if (status == NULL) return 0;
  api->ReleaseStatus(status);
  return 1;
}

/* A version-1 kernel cannot return an error; onnxruntime has checked the shapes against the graph,
   so a failing call here means a broken runtime, and the outputs are left as allocated. */
static void compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = (const Kernel *)state;
  const OrtApi *api = kernel->api;
  const OrtValue *input = NULL, *factors = NULL;
  OrtTensorTypeAndShapeInfo *info = NULL;
  int64_t dims[16];
  size_t rank = 0;
  if (failed(api, api->KernelContext_GetInput(context, 0, &input)) ||
      failed(api, api->GetTensorTypeAndShape(input, &info)))
    return;
  int bad = failed(api, api->GetDimensionsCount(info, &rank)) || rank == 0 || rank > 16 ||
            failed(api, api->GetDimensions(info, dims, rank));
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (bad) return;
  int64_t k = dims[rank - 1], rows = 1;
  for (size_t i = 0; i + 1 < rank; ++i) rows *= dims[i];

  float *x = NULL, *unsmooth = NULL, *peaks = NULL;
  uint8_t *q = NULL;
  OrtValue *q_value = NULL, *peak_value = NULL;
  if (failed(api, api->GetTensorMutableData((OrtValue *)input, (void **)&x))) return;
  if (kernel->smoothed && (failed(api, api->KernelContext_GetInput(context, 1, &factors)) ||
                           failed(api, api->GetTensorMutableData((OrtValue *)factors, (void **)&unsmooth))))
    return;
  if (failed(api, api->KernelContext_GetOutput(context, 0, dims, rank, &q_value)) ||
      failed(api, api->GetTensorMutableData(q_value, (void **)&q)))
    return;
  dims[rank - 1] = 1;
  if (failed(api, api->KernelContext_GetOutput(context, 1, dims, rank, &peak_value)) ||
      failed(api, api->GetTensorMutableData(peak_value, (void **)&peaks)))
    return;
  float *scratch = malloc((size_t)k * sizeof(float));
  if (scratch == NULL) return;
  for (int64_t r = 0; r < rows; ++r) kernel->row(x + r * k, unsmooth, scratch, k, q + r * k, peaks + r);
  free(scratch);
}

static void *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
  (void)info;
  Kernel *kernel = malloc(sizeof(Kernel));
  if (kernel) {
    kernel->api = api;
    kernel->smoothed = ((const RowOp *)op)->smoothed;
    kernel->row = row_function();
  }
  return kernel;
}

static const char *op_name(const OrtCustomOp *op) { return ((const RowOp *)op)->name; }
static const char *on_cpu(const OrtCustomOp *op) { (void)op; return NULL; }
static int input_type(const OrtCustomOp *op, size_t index) { (void)op; (void)index; return ELEMENT_FLOAT; }
static size_t input_count(const OrtCustomOp *op) { return ((const RowOp *)op)->smoothed ? 2 : 1; }
static int output_type(const OrtCustomOp *op, size_t index) { (void)op; return index == 0 ? ELEMENT_UINT8 : ELEMENT_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 2; }
static void destroy_kernel(void *kernel) { free(kernel); }
static int required(const OrtCustomOp *op, size_t index) { (void)op; (void)index; return REQUIRED; }
static int default_memory(const OrtCustomOp *op, size_t index) { (void)op; (void)index; return DEFAULT_MEMORY; }
static int one(const OrtCustomOp *op) { (void)op; return 1; }

#define ROW_OP(NAME, SMOOTHED)                                                                                    \
  {{API_VERSION, create_kernel, op_name, on_cpu, input_type, input_count, output_type, output_count, compute,       \
    destroy_kernel, required, required, default_memory, one, one, one, one, NULL, NULL, NULL, NULL, NULL, NULL,    \
    NULL, NULL, NULL},                                                                                           \
   NAME,                                                                                                         \
   SMOOTHED}

static RowOp OPS[] = {ROW_OP("RowQuantize", 0), ROW_OP("RowQuantizeSmoothed", 1)};

static OrtCustomOpDomain *DOMAIN = NULL; /* made once, shared by every session that registers it */
static OrtStatus *DOMAIN_ERROR = NULL;
static const OrtApi *API = NULL;
static pthread_once_t DOMAIN_ONCE = PTHREAD_ONCE_INIT;

static void make_domain(void) {
  DOMAIN_ERROR = API->CreateCustomOpDomain("ai.kiln", &DOMAIN);
  for (size_t i = 0; DOMAIN_ERROR == NULL && i < sizeof(OPS) / sizeof(OPS[0]); ++i)
    DOMAIN_ERROR = API->CustomOpDomain_Add(DOMAIN, &OPS[i].base);
}

/* onnxruntime's entry point for SessionOptions.register_custom_ops_library. */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options,
                                                                    const OrtApiBase *base) {
  const OrtApi *api = base->GetApi(API_VERSION);
  if (api == NULL) return NULL; /* cannot happen: every onnxruntime serves version 1 */
  API = api;
  pthread_once(&DOMAIN_ONCE, make_domain);
  if (DOMAIN_ERROR != NULL) return api->CreateStatus(ORT_FAIL, "kiln row_quantize: the ai.kiln domain was not made");
  return api->AddCustomOpDomain(options, DOMAIN);
}
