/*
 * kiln's per-row quantiser as one onnxruntime CPU kernel (kiln.runtime.native loads it).
 *
 * kiln's int8 graphs quantise each activation row with its own scale (kiln.export.rowwise_int8), in
 * one of two definitions:
 *
 *     xs   = x * unsmooth                      (the ...Smoothed ops: where the input's channels were smoothed)
 *     peak = ReduceMax(Abs(xs), axis -1)
 *     q    = QuantizeLinear(xs / peak, 1/127, 128)           RowQuantize, RowQuantizeSmoothed (until 2026-12-05)
 *     q    = QuantizeLinear(xs * (127 / peak), 1, 128)       RowQuantize2, RowQuantizeSmoothed2
 *
 * and, for activations bounded below (GELU's outputs), on one side with all 255 codes:
 *
 *     xs   = x * unsmooth + shift
 *     peak = ReduceMax(Abs(xs), axis -1)
 *     q    = QuantizeLinear(xs * (255 / peak), 1, 0)         RowQuantizeShifted2
 *
 * In standard ops that is four to six kernels, each paying onnxruntime's fixed cost per kernel on a
 * text of a few dozen tokens. The graph declares the steps as one op, defined as an ONNX function of
 * exactly those standard ops: without this library onnxruntime inlines the function; with it, this
 * kernel runs them in one pass per row. The kernel does the same IEEE operations in the same order (a
 * float multiply, |x|, the max, then two correctly rounded divisions per value, or one division per
 * row and a multiply per value, MLAS's clamp to [-128, 127] that maps NaN to -128, round half to even,
 * + 128), so its codes and peaks are the same bits as the function's, which the tests check. The
 * second definition exists for speed (the divisions were most of the kernel's time); packages made
 * with the first keep it, and their bits.
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

/* How a definition turns a scaled value into a code: its levels, and QuantizeLinear's zero point and
   clamp, [-zero_point, 255 - zero_point] (MLAS's, before rounding). */
typedef struct Form {
  int reciprocal; /* x * (levels / peak) rather than (x / peak) / (1 / 127) */
  float levels, lo, hi;
  int zero_point;
} Form;

static const Form FIRST = {0, 127.0f, -128.0f, 127.0f, 128};
static const Form SECOND = {1, 127.0f, -128.0f, 127.0f, 128};
static const Form ONE_SIDED = {1, 255.0f, 0.0f, 255.0f, 0};

/* One op: its name, its inputs (the per-channel factors, input 1; the shift, input 2), its form. */
typedef struct RowOp {
  OrtCustomOp base; /* first, so an OrtCustomOp* is a RowOp* */
  const char *name;
  int smoothed, shifted;
  const Form *form;
} RowOp;

/* A row's channels: the input and, where the op takes them, its factors and shift. */
typedef struct Channels {
  const float *x, *unsmooth, *shift;
} Channels;

typedef void (*RowFn)(Channels, float *, int64_t, uint8_t *, float *, const Form *);

typedef struct Kernel {
  const OrtApi *api;
  int smoothed, shifted;
  const Form *form;
  RowFn row; /* the widest instructions this CPU has */
} Kernel;

static const float PER_LEVEL = 1.0f / 127.0f; /* QuantizeLinear's scale in the first definition */

/* The last step for one value: the definition's scaling, then as MLAS's QuantizeLinear does it, clamp
   to [lo, hi] (MAXPS(v, lo): a NaN, an all-zero row's 0 / 0 or 0 * inf, becomes lo), round half to
   even, + the zero point. */
static inline uint8_t code(float xs, float peak, float per_peak, const Form *form) {
  float v = form->reciprocal ? xs * per_peak : (xs / peak) / PER_LEVEL;
  v = v > form->lo ? v : form->lo;
  v = v < form->hi ? v : form->hi;
  return (uint8_t)(lrintf(v) + form->zero_point);
}

/* The smoothed (and shifted) values xs[i..k) and the largest |xs| of them and `peak`: the vector
   forms' tails. A multiply, then an add: two roundings, as Mul and Add (C11 does not contract them). */
static float peak_from(Channels c, float *xs, int64_t i, int64_t k, float peak) {
  for (; i < k; ++i) {
    xs[i] = c.unsmooth ? c.x[i] * c.unsmooth[i] : c.x[i];
    if (c.shift) xs[i] = xs[i] + c.shift[i];
    float a = fabsf(xs[i]);
    peak = a > peak ? a : peak;
  }
  return peak;
}

/* One row, portably: what Mul, Add, Abs, ReduceMax, Div and QuantizeLinear compute, in their order. */
static void quantize_row_plain(Channels c, float *xs, int64_t k, uint8_t *q, float *peak_out, const Form *form) {
  float peak = peak_from(c, xs, 0, k, -INFINITY), per_peak = form->levels / peak;
  *peak_out = peak;
  for (int64_t i = 0; i < k; ++i) q[i] = code(xs[i], peak, per_peak, form);
}

#if defined(__x86_64__)
#include <immintrin.h>

/* The same with AVX-512: 16 lanes, the same IEEE operations (vdivps is correctly rounded, vcvtps2dq
   rounds half to even), the codes narrowed by vpmovusdb. */
__attribute__((target("avx512f"))) static void quantize_row_avx512(Channels c, float *xs, int64_t k, uint8_t *q,
                                                                   float *peak_out, const Form *form) {
  __m512 peaks = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 v = _mm512_loadu_ps(c.x + i);
    if (c.unsmooth) v = _mm512_mul_ps(v, _mm512_loadu_ps(c.unsmooth + i));
    if (c.shift) v = _mm512_add_ps(v, _mm512_loadu_ps(c.shift + i));
    _mm512_storeu_ps(xs + i, v);
    peaks = _mm512_max_ps(_mm512_abs_ps(v), peaks);
  }
  float peak = peak_from(c, xs, i, k, _mm512_reduce_max_ps(peaks)), per_peak = form->levels / peak;
  *peak_out = peak;
  const __m512 p = _mm512_set1_ps(peak), per_level = _mm512_set1_ps(PER_LEVEL), pp = _mm512_set1_ps(per_peak);
  const __m512 lo = _mm512_set1_ps(form->lo), hi = _mm512_set1_ps(form->hi);
  const __m512i zero_point = _mm512_set1_epi32(form->zero_point);
  for (i = 0; i + 16 <= k; i += 16) {
    __m512 v = _mm512_loadu_ps(xs + i);
    v = form->reciprocal ? _mm512_mul_ps(v, pp) : _mm512_div_ps(_mm512_div_ps(v, p), per_level);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi); /* max(NaN, lo) is lo */
    __m512i codes = _mm512_add_epi32(_mm512_cvtps_epi32(v), zero_point);
    _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtusepi32_epi8(codes));
  }
  for (; i < k; ++i) q[i] = code(xs[i], peak, per_peak, form);
}

/* AVX2: 8 lanes; 32 codes at a time narrowed by two packs and a lane fix-up. */
__attribute__((target("avx2"))) static void quantize_row_avx2(Channels c, float *xs, int64_t k, uint8_t *q,
                                                              float *peak_out, const Form *form) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 peaks = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 v = _mm256_loadu_ps(c.x + i);
    if (c.unsmooth) v = _mm256_mul_ps(v, _mm256_loadu_ps(c.unsmooth + i));
    if (c.shift) v = _mm256_add_ps(v, _mm256_loadu_ps(c.shift + i));
    _mm256_storeu_ps(xs + i, v);
    peaks = _mm256_max_ps(_mm256_and_ps(v, sign), peaks);
  }
  float lanes[8], peak = -INFINITY;
  _mm256_storeu_ps(lanes, peaks);
  for (int j = 0; j < 8; ++j) peak = lanes[j] > peak ? lanes[j] : peak;
  peak = peak_from(c, xs, i, k, peak);
  const float per_peak = form->levels / peak;
  *peak_out = peak;
  const __m256 p = _mm256_set1_ps(peak), per_level = _mm256_set1_ps(PER_LEVEL), pp = _mm256_set1_ps(per_peak);
  const __m256 lo = _mm256_set1_ps(form->lo), hi = _mm256_set1_ps(form->hi);
  const __m256i zero_point = _mm256_set1_epi32(form->zero_point), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i codes[4];
  for (i = 0; i + 32 <= k; i += 32) {
    for (int j = 0; j < 4; ++j) {
      __m256 v = _mm256_loadu_ps(xs + i + 8 * j);
      v = form->reciprocal ? _mm256_mul_ps(v, pp) : _mm256_div_ps(_mm256_div_ps(v, p), per_level);
      v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
      codes[j] = _mm256_add_epi32(_mm256_cvtps_epi32(v), zero_point);
    }
    __m256i words = _mm256_packus_epi16(_mm256_packus_epi32(codes[0], codes[1]), _mm256_packus_epi32(codes[2], codes[3]));
    _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(words, order));
  }
  for (; i < k; ++i) q[i] = code(xs[i], peak, per_peak, form);
}
#endif

/* The widest form this CPU runs; KILN_ROW_QUANTIZE_ISA=avx2|plain asks for a narrower one, so the
   tests check every form a machine has against the standard ops. */
static RowFn row_function(void) {
#if defined(__x86_64__)
  switch (kiln_isa("KILN_ROW_QUANTIZE_ISA")) {
  case ISA_AVX512: return quantize_row_avx512;
  case ISA_AVX2: return quantize_row_avx2;
  case ISA_PLAIN: break;
  }
#endif
  return quantize_row_plain;
}

/* Rows are independent (each its own scale), so a large call splits them across onnxruntime's thread
   pool; a text's few dozen rows stay on one thread, where a dispatch would cost more than it saves. */
enum { BLOCKS = 16 };
static const int64_t PARALLEL_VALUES = 1 << 16;

typedef struct Rows {
  const Kernel *kernel;
  Channels channels;
  uint8_t *q;
  float *peaks;
  int64_t k, rows, per_block;
} Rows;

static void quantize_block(void *data, size_t block) {
  const Rows *w = (const Rows *)data;
  const int64_t first = (int64_t)block * w->per_block;
  const int64_t last = first + w->per_block < w->rows ? first + w->per_block : w->rows;
  float *scratch = malloc((size_t)w->k * sizeof(float));
  if (scratch == NULL) return;
  for (int64_t r = first; r < last; ++r) {
    Channels row = w->channels;
    row.x += r * w->k;
    w->kernel->row(row, scratch, w->k, w->q + r * w->k, w->peaks + r, w->kernel->form);
  }
  free(scratch);
}

/* A version-1 kernel cannot return an error; onnxruntime has checked the shapes against the graph,
   so a failing call here means a broken runtime, and the outputs are left as allocated. */
static void compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = (const Kernel *)state;
  const OrtApi *api = kernel->api;
  const OrtValue *input = NULL, *factors = NULL, *shifts = NULL;
  int64_t dims[16];
  size_t rank = 0;
  if (kiln_failed(api, api->KernelContext_GetInput(context, 0, &input)) || kiln_input_shape(api, input, dims, &rank))
    return;
  int64_t k = dims[rank - 1], rows = 1;
  for (size_t i = 0; i + 1 < rank; ++i) rows *= dims[i];

  float *x = NULL, *unsmooth = NULL, *shift = NULL, *peaks = NULL;
  uint8_t *q = NULL;
  OrtValue *q_value = NULL, *peak_value = NULL;
  if (kiln_failed(api, api->GetTensorMutableData((OrtValue *)input, (void **)&x))) return;
  if (kernel->smoothed && (kiln_failed(api, api->KernelContext_GetInput(context, 1, &factors)) ||
                           kiln_failed(api, api->GetTensorMutableData((OrtValue *)factors, (void **)&unsmooth))))
    return;
  if (kernel->shifted && (kiln_failed(api, api->KernelContext_GetInput(context, 2, &shifts)) ||
                          kiln_failed(api, api->GetTensorMutableData((OrtValue *)shifts, (void **)&shift))))
    return;
  if (kiln_failed(api, api->KernelContext_GetOutput(context, 0, dims, rank, &q_value)) ||
      kiln_failed(api, api->GetTensorMutableData(q_value, (void **)&q)))
    return;
  dims[rank - 1] = 1;
  if (kiln_failed(api, api->KernelContext_GetOutput(context, 1, dims, rank, &peak_value)) ||
      kiln_failed(api, api->GetTensorMutableData(peak_value, (void **)&peaks)))
    return;
  Rows work = {kernel, {x, unsmooth, shift}, q, peaks, k, rows, (rows + BLOCKS - 1) / BLOCKS};
  const size_t blocks = (size_t)((rows + work.per_block - 1) / work.per_block);
  if (kiln_has_parallel_for && rows * k >= PARALLEL_VALUES && blocks > 1 &&
      !kiln_failed(api, api->KernelContext_ParallelFor(context, quantize_block, blocks, 0, &work)))
    return;
  work.per_block = rows;
  quantize_block(&work, 0);
}

static void *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
  (void)info;
  Kernel *kernel = malloc(sizeof(Kernel));
  if (kernel) {
    kernel->api = api;
    kernel->smoothed = ((const RowOp *)op)->smoothed;
    kernel->shifted = ((const RowOp *)op)->shifted;
    kernel->form = ((const RowOp *)op)->form;
    kernel->row = row_function();
  }
  return kernel;
}

static const char *op_name(const OrtCustomOp *op) { return ((const RowOp *)op)->name; }
static int input_type(const OrtCustomOp *op, size_t index) { (void)op; (void)index; return ELEMENT_FLOAT; }
static size_t input_count(const OrtCustomOp *op) {
  const RowOp *row = (const RowOp *)op;
  return 1 + (size_t)row->smoothed + (size_t)row->shifted;
}
static int output_type(const OrtCustomOp *op, size_t index) { (void)op; return index == 0 ? ELEMENT_UINT8 : ELEMENT_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 2; }

#define ROW_OP(NAME, SMOOTHED, SHIFTED, FORM)                                                                       \
  {KILN_CUSTOM_OP(create_kernel, op_name, input_type, input_count, output_type, output_count, compute), NAME, SMOOTHED, \
   SHIFTED, FORM}

static RowOp OPS[] = {ROW_OP("RowQuantize", 0, 0, &FIRST), ROW_OP("RowQuantizeSmoothed", 1, 0, &FIRST),
                      ROW_OP("RowQuantize2", 0, 0, &SECOND), ROW_OP("RowQuantizeSmoothed2", 1, 0, &SECOND),
                      ROW_OP("RowQuantizeShifted2", 1, 1, &ONE_SIDED)};
OrtCustomOp *const kiln_row_quantize_ops[5] = {&OPS[0].base, &OPS[1].base, &OPS[2].base, &OPS[3].base, &OPS[4].base};
