/*
 * ai.kiln.SkipLayerNorm: a residual block's end in one onnxruntime CPU kernel (kiln.export.skip_layer_norm).
 *
 *     y = LayerNormalization((x + bias) + skip, gamma, beta) {axis -1, epsilon}
 *
 * In a transformer encoder the projection's bias, the residual and the LayerNorm are three kernels,
 * each a pass over the tensor and onnxruntime's fixed cost per kernel; its own LayerNormalization sums
 * each row one value after another, so on a text of a few dozen tokens the three take ~10% of an int8
 * roberta-base run. onnxruntime's fused SkipLayerNormalization is slower still on CPU (kiln.runtime.session
 * leaves it off). Here one pass adds and sums, a second sums the squared deviations (the definition's
 * two-pass variance, not E[x^2] - mean^2), a third scales; each sum runs in 16 lanes reduced in a fixed
 * order, so every instruction set gives the same bits (the tests check it) and a row's result does not
 * depend on the other rows. Against the function's standard ops the results agree to float rounding,
 * not bit for bit (onnxruntime sums sequentially and divides by the deviation; this multiplies by its
 * inverse); the export gates the package in both forms.
 */

#include <math.h>
#include <stdlib.h>

#include "ort_abi.h"

enum { LANES = 16 };

typedef struct Work Work;
typedef void (*RowsFn)(const Work *, int64_t, int64_t);

struct Work {
  const float *x, *bias, *skip, *gamma, *beta;
  float *y;
  int64_t k, rows, per_block;
  float epsilon;
  RowsFn rows_fn; /* the kernel's: the widest form this CPU runs */
};

typedef struct Kernel {
  const OrtApi *api;
  float epsilon;
  RowsFn rows;
} Kernel;

/* Sixteen lanes summed pairwise, always in this order. */
static inline float lanes_sum(float *acc) {
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

/* Rows [first, last): the loops over lanes are what each target's compiler vectorises. */
static inline void rows_body(const Work *w, int64_t first, int64_t last) {
  const int64_t k = w->k, whole = k / LANES * LANES;
  const float *bias = w->bias, *gamma = w->gamma, *beta = w->beta;
  for (int64_t r = first; r < last; ++r) {
    const float *x = w->x + r * k, *skip = w->skip + r * k;
    float *y = w->y + r * k;
    float acc[LANES] = {0}, tail = 0.0f;
    for (int64_t i = 0; i < whole; i += LANES)
      for (int l = 0; l < LANES; ++l) {
        const float s = (x[i + l] + bias[i + l]) + skip[i + l];
        y[i + l] = s;
        acc[l] += s;
      }
    for (int64_t i = whole; i < k; ++i) {
      y[i] = (x[i] + bias[i]) + skip[i];
      tail += y[i];
    }
    const float mean = (lanes_sum(acc) + tail) / (float)k;
    float squares[LANES] = {0};
    tail = 0.0f;
    for (int64_t i = 0; i < whole; i += LANES)
      for (int l = 0; l < LANES; ++l) {
        const float d = y[i + l] - mean;
        squares[l] += d * d;
      }
    for (int64_t i = whole; i < k; ++i) tail += (y[i] - mean) * (y[i] - mean);
    const float inverse = 1.0f / sqrtf((lanes_sum(squares) + tail) / (float)k + w->epsilon);
    for (int64_t i = 0; i < k; ++i) y[i] = (y[i] - mean) * inverse * gamma[i] + beta[i];
  }
}

/* The same body compiled for each instruction set; the widest the CPU has runs. */
static void rows_plain(const Work *w, int64_t first, int64_t last) { rows_body(w, first, last); }
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static void rows_avx2(const Work *w, int64_t first, int64_t last) {
  rows_body(w, first, last);
}
__attribute__((target("avx512f,prefer-vector-width=512"))) static void rows_avx512(const Work *w, int64_t first,
                                                                                  int64_t last) {
  rows_body(w, first, last);
}
#endif

/* KILN_LAYER_NORM_ISA=avx2|plain asks for a narrower form, so the tests check they agree bit for bit. */
static RowsFn rows_function(void) {
#if defined(__x86_64__)
  switch (kiln_isa("KILN_LAYER_NORM_ISA")) {
  case ISA_AVX512: return rows_avx512;
  case ISA_AVX2: return rows_avx2;
  case ISA_PLAIN: break;
  }
#endif
  return rows_plain;
}

/* As the row quantiser: a large call's rows split across onnxruntime's thread pool, a text's stay here. */
enum { BLOCKS = 16 };
static const int64_t PARALLEL_VALUES = 1 << 16;

static void run_block(void *data, size_t block) {
  const Work *w = (const Work *)data;
  const int64_t first = (int64_t)block * w->per_block;
  w->rows_fn(w, first, first + w->per_block < w->rows ? first + w->per_block : w->rows);
}

static int same_shape(const int64_t *a, size_t rank_a, const int64_t *b, size_t rank_b) {
  if (rank_a != rank_b) return 0;
  for (size_t i = 0; i < rank_a; ++i)
    if (a[i] != b[i]) return 0;
  return 1;
}

/* onnxruntime has checked each input's type against the graph, not that the shapes fit together: a
   call whose shapes disagree fails with a message rather than reading past a tensor. */
static OrtStatus *compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = (const Kernel *)state;
  const OrtApi *api = kernel->api;
  const OrtValue *inputs[5] = {NULL};
  int64_t dims[5][16];
  size_t ranks[5] = {0};
  for (size_t i = 0; i < 5; ++i)
    if (kiln_failed(api, api->KernelContext_GetInput(context, i, &inputs[i])) ||
        kiln_input_shape(api, inputs[i], dims[i], &ranks[i]))
      return api->CreateStatus(ORT_FAIL, "kiln SkipLayerNorm: onnxruntime gave no inputs");
  const int64_t k = dims[0][ranks[0] - 1];
  int fits = same_shape(dims[0], ranks[0], dims[2], ranks[2]);
  const size_t vectors[] = {1, 3, 4}; /* bias, gamma, beta */
  for (size_t v = 0; v < 3; ++v) fits = fits && ranks[vectors[v]] == 1 && dims[vectors[v]][0] == k;
  if (!fits || k == 0)
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "kiln SkipLayerNorm: x and skip must have one shape [..., k], "
                                                   "bias, gamma and beta [k], k > 0");
  Work w = {.k = k, .rows = 1, .epsilon = kernel->epsilon, .rows_fn = kernel->rows};
  for (size_t i = 0; i + 1 < ranks[0]; ++i) w.rows *= dims[0][i];
  float **data[5] = {(float **)&w.x, (float **)&w.bias, (float **)&w.skip, (float **)&w.gamma, (float **)&w.beta};
  OrtValue *out = NULL;
  for (size_t i = 0; i < 5; ++i)
    if (kiln_failed(api, api->GetTensorMutableData((OrtValue *)inputs[i], (void **)data[i])))
      return api->CreateStatus(ORT_FAIL, "kiln SkipLayerNorm: onnxruntime gave no input data");
  if (kiln_failed(api, api->KernelContext_GetOutput(context, 0, dims[0], ranks[0], &out)) ||
      kiln_failed(api, api->GetTensorMutableData(out, (void **)&w.y)))
    return api->CreateStatus(ORT_FAIL, "kiln SkipLayerNorm: onnxruntime gave no output");
  w.per_block = (w.rows + BLOCKS - 1) / BLOCKS;
  const size_t blocks = w.rows ? (size_t)((w.rows + w.per_block - 1) / w.per_block) : 0;
  if (kiln_has_parallel_for && w.rows * k >= PARALLEL_VALUES && blocks > 1 &&
      !kiln_failed(api, api->KernelContext_ParallelFor(context, run_block, blocks, 0, &w)))
    return NULL;
  w.rows_fn(&w, 0, w.rows);
  return NULL;
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op;
  float epsilon = 0.0f;
  if (kiln_failed(api, api->KernelInfoGetAttribute_float(info, "epsilon", &epsilon)) || !(epsilon >= 0.0f))
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "kiln SkipLayerNorm: needs epsilon >= 0");
  Kernel *kernel = malloc(sizeof(Kernel));
  if (kernel == NULL) return api->CreateStatus(ORT_FAIL, "kiln SkipLayerNorm: out of memory");
  kernel->api = api;
  kernel->epsilon = epsilon;
  kernel->rows = rows_function();
  *out = kernel;
  return NULL;
}

static const char *op_name(const OrtCustomOp *op) { (void)op; return "SkipLayerNorm"; }
static int input_type(const OrtCustomOp *op, size_t index) { (void)op; (void)index; return ELEMENT_FLOAT; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 5; }
static int output_type(const OrtCustomOp *op, size_t index) { (void)op; (void)index; return ELEMENT_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 1; }

static OrtCustomOp OP = KILN_CUSTOM_OP_THAT_CAN_FAIL(create_kernel, op_name, input_type, input_count, output_type,
                                                    output_count, compute);
OrtCustomOp *const kiln_layer_norm_ops[1] = {&OP};
