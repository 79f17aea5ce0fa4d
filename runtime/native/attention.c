/*
 * ai.kiln.SelfAttention: multi-head self-attention over the packed output of a Q, K and V projection.
 *
 *     SelfAttention(qkv [B, S, 3 D], bias [3 D], lengths int32 [B]) -> [B, S, D]     (num_heads = N, D = N H)
 *
 * what onnxruntime's Split + MultiHeadAttention compute from the same inputs (the graph defines the op as
 * exactly those two, an ONNX function, so a package runs without this library): per text and head,
 * softmax((q + bq)(k + bk)^T / sqrt(H)) (v + bv) over the text's first `lengths[b]` keys (right padding).
 *
 * Why a kernel: on a text of a few dozen tokens the arithmetic is tiny (12 heads x 25 x 25 x 32) and
 * onnxruntime's MultiHeadAttention spends its time around it (transposes, a GEMM call per head, a
 * thread-pool dispatch), 50-60 us a layer on a Xeon where this takes a few.
 *
 * Not the same bits as onnxruntime's (its exp and GEMM kernels differ by CPU); what it promises instead:
 * - a text's outputs depend only on its own tokens: every loop runs over the text's own keys, in an
 *   order fixed by its length alone, so a text gives the same bits alone and in any padded batch;
 * - the same bits on AVX2 and AVX-512: one C body compiled per target, lane-parallel loops the
 *   compiler vectorises without reordering a sum, multiply-adds fused on both (the portable form,
 *   without FMA, rounds them twice: float rounding apart).
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

#pragma GCC optimize("fp-contract=fast")

enum { LANES = 16 };                       /* one AVX-512 register of floats; sums run per lane */
static const int64_t PARALLEL_WORK = 1 << 20; /* multiply-adds below which one thread does all heads */

typedef struct Work Work;
typedef void (*HeadFn)(const Work *w, size_t task, float *scratch);

typedef struct Kernel {
  const OrtApi *api;
  int64_t heads;
  HeadFn head; /* the widest instructions this CPU has */
} Kernel;

/* One call's tensors and sizes, shared by its (text, head) tasks. */
struct Work {
  const float *qkv, *bias;
  const int32_t *lengths;
  float *out;
  int64_t seq, heads, head_size;
  float scale;
  HeadFn head;
  volatile int out_of_memory; /* set by a task whose scratch could not be had */
};

/* exp(x) for x <= 0 (and -inf), without libm, in operations that vectorise and round alike on every
   target: 2^n by the exponent bits, a degree-6 polynomial on the remainder (Cephes' expf). */
static inline float exp_nonpositive(float x) {
  x = x > -87.0f ? x : -87.0f;
  float t = x * 1.44269504088896341f + 12582912.0f; /* round to nearest by the 1.5 * 2^23 trick */
  float n = t - 12582912.0f;
  float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * (r * r) + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

/* 16 floats as one value: GCC compiles its arithmetic to one AVX-512 register, two AVX2 ones or four SSE
   ones, lane by lane, the same operations either way. */
typedef float Lanes __attribute__((vector_size(LANES * sizeof(float))));

static inline __attribute__((always_inline)) Lanes load(const float *from) {
  Lanes v;
  memcpy(&v, from, sizeof v);
  return v;
}

/* Query rows run ROWS at a time: their sums are independent chains the CPU overlaps, each in the order
   a row alone would use (the last group repeats its last row rather than take a shorter path). */
enum { ROWS = 4 };

typedef int32_t LaneInts __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline __attribute__((always_inline)) Lanes lanes_max(Lanes a, Lanes b) {
  const LaneInts a_wins = a > b;
  return (Lanes)(((LaneInts)a & a_wins) | ((LaneInts)b & ~a_wins));
}

/* Across the lanes, as a tree of shuffles: four steps, not a chain of fifteen. */
static inline __attribute__((always_inline)) float lanes_top(Lanes v) {
  v = lanes_max(v, __builtin_shuffle(v, (LaneInts){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = lanes_max(v, __builtin_shuffle(v, (LaneInts){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  v = lanes_max(v, __builtin_shuffle(v, (LaneInts){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  v = lanes_max(v, __builtin_shuffle(v, (LaneInts){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  return v[0];
}

static inline __attribute__((always_inline)) float lanes_sum(Lanes v) {
  v += __builtin_shuffle(v, (LaneInts){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, (LaneInts){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, (LaneInts){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, (LaneInts){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

/* Softmax of one row's scores over its first `length` (the lanes past it in the last block become 0);
   returns 1 / sum. Whole blocks only: a scalar store before a vector load of it stalls the CPU. */
static inline __attribute__((always_inline)) float softmax_row(float *p, int64_t length, int64_t padded) {
  const LaneInts lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const LaneInts last_valid = (LaneInts){0} + (int32_t)(length - (padded - LANES)) > lane;
  const Lanes minus_infinity = (Lanes){0} - INFINITY;
  Lanes last = load(p + padded - LANES);
  last = (Lanes)(((LaneInts)last & last_valid) | ((LaneInts)minus_infinity & ~last_valid));
  Lanes top = last;
  for (int64_t jb = 0; jb + LANES < padded; jb += LANES) top = lanes_max(top, load(p + jb));
  const float peak = lanes_top(top);
  Lanes sum = {0};
  for (int64_t jb = 0; jb < padded; jb += LANES) {
    Lanes e;
    for (int l = 0; l < LANES; ++l) e[l] = exp_nonpositive(p[jb + l] - peak);
    if (jb + LANES == padded) e = (Lanes)((LaneInts)e & last_valid);
    sum += e;
    memcpy(p + jb, &e, sizeof e);
  }
  return 1.0f / lanes_sum(sum);
}

/* One text's one head: all its query rows over its own keys. `scratch` holds scratch_floats() floats. */
static inline __attribute__((always_inline)) void head_body(const Work *w, size_t task, float *scratch) {
  const int64_t b = (int64_t)task / w->heads, h = (int64_t)task % w->heads, hs = w->head_size;
  const int64_t width = 3 * w->heads * hs, seq = w->seq;
  int64_t length = w->lengths[b];
  const int uniform = length <= 0; /* no key to attend to: as the function, every position weighs alike */
  if (uniform || length > seq) length = seq;
  const int64_t padded = (length + LANES - 1) / LANES * LANES;
  const float *rows = w->qkv + b * seq * width;
  const float *bq = w->bias + h * hs, *bk = bq + w->heads * hs, *bv = bk + w->heads * hs;
  const float scale = uniform ? 0.0f : w->scale;
  float *kt = scratch, *v = kt + hs * padded, *p = v + padded * hs, *q = p + ROWS * padded;

  memset(kt, 0, (size_t)(hs * padded) * sizeof(float));
  for (int64_t j = 0; j < length; ++j) {
    const float *k = rows + j * width + w->heads * hs + h * hs, *vj = k + w->heads * hs;
    for (int64_t d = 0; d < hs; ++d) kt[d * padded + j] = k[d] + bk[d];
    for (int64_t d = 0; d < hs; ++d) v[j * hs + d] = vj[d] + bv[d];
  }
  for (int64_t first = 0; first < seq; first += ROWS) {
    int64_t row[ROWS];
    for (int r = 0; r < ROWS; ++r) row[r] = first + r < seq ? first + r : seq - 1;
    for (int r = 0; r < ROWS; ++r)
      for (int64_t d = 0; d < hs; ++d) q[r * hs + d] = rows[row[r] * width + h * hs + d] + bq[d];
    for (int64_t jb = 0; jb < padded; jb += LANES) {
      Lanes acc[ROWS] = {{0}};
      for (int64_t d = 0; d < hs; ++d) {
        const Lanes keys = load(kt + d * padded + jb);
        for (int r = 0; r < ROWS; ++r) acc[r] += q[r * hs + d] * keys;
      }
      for (int r = 0; r < ROWS; ++r) {
        acc[r] *= scale;
        memcpy(p + r * padded + jb, &acc[r], sizeof acc[r]);
      }
    }
    float inverse[ROWS];
    for (int r = 0; r < ROWS; ++r) inverse[r] = softmax_row(p + r * padded, length, padded);
    int64_t d = 0;
    for (; d + LANES <= hs; d += LANES) {
      Lanes acc[ROWS] = {{0}};
      for (int64_t j = 0; j < length; ++j) {
        const Lanes values = load(v + j * hs + d);
        for (int r = 0; r < ROWS; ++r) acc[r] += p[r * padded + j] * values;
      }
      for (int r = 0; r < ROWS; ++r) {
        acc[r] *= inverse[r];
        memcpy(w->out + (b * seq + row[r]) * w->heads * hs + h * hs + d, &acc[r], sizeof acc[r]);
      }
    }
    for (; d < hs; ++d)
      for (int r = 0; r < ROWS; ++r) {
        float acc = 0.0f;
        for (int64_t j = 0; j < length; ++j) acc += p[r * padded + j] * v[j * hs + d];
        w->out[(b * seq + row[r]) * w->heads * hs + h * hs + d] = acc * inverse[r];
      }
  }
}

/* The same body compiled for each instruction set; the widest the CPU has runs. */
static void head_plain(const Work *w, size_t task, float *scratch) { head_body(w, task, scratch); }
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static void head_avx2(const Work *w, size_t task, float *scratch) {
  head_body(w, task, scratch);
}
__attribute__((target("avx512f,prefer-vector-width=512"))) static void head_avx512(const Work *w, size_t task,
                                                                                  float *scratch) {
  head_body(w, task, scratch);
}
#endif

/* KILN_ATTENTION_ISA=avx2|plain asks for a narrower form, so the tests check they agree bit for bit. */
static HeadFn head_function(void) {
#if defined(__x86_64__)
  switch (kiln_isa("KILN_ATTENTION_ISA")) {
  case ISA_AVX512: return head_avx512;
  case ISA_AVX2: return head_avx2;
  case ISA_PLAIN: break;
  }
#endif
  return head_plain;
}

static size_t scratch_floats(const Work *w) {
  const int64_t padded = (w->seq + LANES - 1) / LANES * LANES;
  return (size_t)(2 * w->head_size * padded + ROWS * (padded + w->head_size)); /* keys, values, scores, queries */
}

/* One task of the thread pool: a (text, head) pair with its own scratch. */
static void run_task(void *data, size_t task) {
  Work *w = (Work *)data;
  float *scratch = malloc(scratch_floats(w) * sizeof(float));
  if (scratch == NULL) {
    w->out_of_memory = 1; /* every task that fails writes the same 1 */
    return;
  }
  w->head(w, task, scratch);
  free(scratch);
}

/* onnxruntime has checked each input's type and rank against the graph, not that they fit together:
   a call whose shapes disagree fails with a message rather than reading past a tensor. */
static OrtStatus *compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = (const Kernel *)state;
  const OrtApi *api = kernel->api;
  const OrtValue *qkv = NULL, *bias = NULL, *lengths = NULL;
  OrtValue *out = NULL;
  int64_t dims[16], bias_dims[16], length_dims[16];
  size_t rank = 0, bias_rank = 0, length_rank = 0;
  if (kiln_failed(api, api->KernelContext_GetInput(context, 0, &qkv)) ||
      kiln_failed(api, api->KernelContext_GetInput(context, 1, &bias)) ||
      kiln_failed(api, api->KernelContext_GetInput(context, 2, &lengths)) || kiln_input_shape(api, qkv, dims, &rank) ||
      kiln_input_shape(api, bias, bias_dims, &bias_rank) || kiln_input_shape(api, lengths, length_dims, &length_rank))
    return api->CreateStatus(ORT_FAIL, "kiln SelfAttention: onnxruntime gave no inputs");
  if (rank != 3 || dims[2] % (3 * kernel->heads) != 0 || bias_rank != 1 || bias_dims[0] != dims[2] ||
      length_rank != 1 || length_dims[0] != dims[0])
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "kiln SelfAttention: qkv must be [batch, seq, 3 x num_heads x "
                                                   "head_size], bias [3 x num_heads x head_size], key lengths [batch]");
  Work w = {.seq = dims[1], .heads = kernel->heads, .head_size = dims[2] / (3 * kernel->heads), .head = kernel->head};
  w.scale = 1.0f / sqrtf((float)w.head_size);
  dims[2] /= 3;
  if (kiln_failed(api, api->GetTensorMutableData((OrtValue *)qkv, (void **)&w.qkv)) ||
      kiln_failed(api, api->GetTensorMutableData((OrtValue *)bias, (void **)&w.bias)) ||
      kiln_failed(api, api->GetTensorMutableData((OrtValue *)lengths, (void **)&w.lengths)) ||
      kiln_failed(api, api->KernelContext_GetOutput(context, 0, dims, 3, &out)) ||
      kiln_failed(api, api->GetTensorMutableData(out, (void **)&w.out)))
    return api->CreateStatus(ORT_FAIL, "kiln SelfAttention: onnxruntime gave no output");
  const size_t tasks = (size_t)(dims[0] * kernel->heads);
  if (kiln_has_parallel_for && dims[0] * dims[1] * dims[1] * dims[2] > PARALLEL_WORK &&
      !kiln_failed(api, api->KernelContext_ParallelFor(context, run_task, tasks, 0, &w)))
    return w.out_of_memory ? api->CreateStatus(ORT_FAIL, "kiln SelfAttention: out of memory") : NULL;
  float *scratch = malloc(scratch_floats(&w) * sizeof(float));
  if (scratch == NULL) return api->CreateStatus(ORT_FAIL, "kiln SelfAttention: out of memory");
  for (size_t task = 0; task < tasks; ++task) w.head(&w, task, scratch);
  free(scratch);
  return NULL;
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op;
  int64_t heads = 0;
  if (kiln_failed(api, api->KernelInfoGetAttribute_int64(info, "num_heads", &heads)) || heads <= 0)
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "kiln SelfAttention: needs num_heads > 0");
  Kernel *kernel = malloc(sizeof(Kernel));
  if (kernel == NULL) return api->CreateStatus(ORT_FAIL, "kiln SelfAttention: out of memory");
  kernel->api = api;
  kernel->heads = heads;
  kernel->head = head_function();
  *out = kernel;
  return NULL;
}

static const char *op_name(const OrtCustomOp *op) { (void)op; return "SelfAttention"; }
static int input_type(const OrtCustomOp *op, size_t index) { (void)op; return index == 2 ? ELEMENT_INT32 : ELEMENT_FLOAT; }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 3; }
static int output_type(const OrtCustomOp *op, size_t index) { (void)op; (void)index; return ELEMENT_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 1; }

static OrtCustomOp OP = KILN_CUSTOM_OP_THAT_CAN_FAIL(create_kernel, op_name, input_type, input_count, output_type,
                                                    output_count, compute);
OrtCustomOp *const kiln_attention_ops[1] = {&OP};
