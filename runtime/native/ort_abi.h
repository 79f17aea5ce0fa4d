/*
 * onnxruntime's C ABI, the part kiln's kernels use, declared from its onnxruntime_c_api.h.
 *
 * OrtApi is a table of function pointers that only ever grows at its end, so an entry's position holds
 * in every release from the one that added it: the early entries (API version 1) in every release since
 * 1.0, KernelContext_ParallelFor in every release kiln supports (onnxruntime >= 1.20, API version 20).
 * The headers are in no onnxruntime wheel, hence this file; the asserts pin each position.
 */
#ifndef KILN_ORT_ABI_H
#define KILN_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;

enum { ELEMENT_FLOAT = 1, ELEMENT_UINT8 = 2, ELEMENT_INT32 = 6 }; /* ONNXTensorElementDataType */
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };                 /* OrtErrorCode */
enum { REQUIRED = 0, DEFAULT_MEMORY = 0 }; /* OrtCustomOpInputOutputCharacteristic, OrtMemType */
#define API_VERSION 1                      /* the table and custom-op layout the kernels are written to */
#define CAN_FAIL_API_VERSION 16            /* custom ops whose kernels return a status */
#define PARALLEL_FOR_API_VERSION 20        /* the first API version kiln relies on for ParallelFor */

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
  void *unused_66_84[19];
  OrtStatus *(*KernelInfoGetAttribute_float)(const OrtKernelInfo *info, const char *name, float *out);   /* 85 */
  OrtStatus *(*KernelInfoGetAttribute_int64)(const OrtKernelInfo *info, const char *name, int64_t *out); /* 86 */
  void *unused_87_89[3];
  OrtStatus *(*KernelContext_GetInput)(const OrtKernelContext *context, size_t index, const OrtValue **out); /* 90 */
  OrtStatus *(*KernelContext_GetOutput)(OrtKernelContext *context, size_t index, const int64_t *dims, size_t count,
                                        OrtValue **out); /* 91 */
  void *unused_92;
  void (*ReleaseStatus)(OrtStatus *status); /* 93 */
  void *unused_94_98[5];
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info); /* 99 */
  void *unused_100_273[174];
  OrtStatus *(*KernelContext_ParallelFor)(const OrtKernelContext *context, void (*fn)(void *, size_t), size_t total,
                                          size_t num_batch, void *usr_data); /* 274 */
} OrtApi;

_Static_assert(offsetof(OrtApi, CreateCustomOpDomain) == 26 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, GetTensorMutableData) == 51 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, GetDimensionsCount) == 61 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, GetTensorTypeAndShape) == 65 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, KernelInfoGetAttribute_float) == 85 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, KernelInfoGetAttribute_int64) == 86 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, KernelContext_GetInput) == 90 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, ReleaseStatus) == 93 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, ReleaseTensorTypeAndShapeInfo) == 99 * sizeof(void *), "OrtApi layout");
_Static_assert(offsetof(OrtApi, KernelContext_ParallelFor) == 274 * sizeof(void *), "OrtApi layout");

typedef struct OrtApiBase {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

/* The whole struct as onnxruntime reads it today: it calls GetInputCharacteristic whatever the version
   says, so every field is here; the ops declare version 1, so onnxruntime uses the version-1 kernel
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
  OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                               void **kernel);                 /* version 16 */
  OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context); /* version 16: a kernel that can fail */
  void *InferOutputShapeFn; /* version 17 */
  void *GetStartVersion;    /* version 17 */
  void *GetEndVersion;      /* version 17 */
  void *GetMayInplace;      /* version 18 */
  void *ReleaseMayInplace;  /* version 18 */
  void *GetAliasMap;        /* version 20 */
  void *ReleaseAliasMap;    /* version 20 */
} OrtCustomOp;

/* The callbacks every kiln op shares (kernels.c). */
const char *kiln_on_cpu(const OrtCustomOp *op);
int kiln_required(const OrtCustomOp *op, size_t index);
int kiln_default_memory(const OrtCustomOp *op, size_t index);
int kiln_one(const OrtCustomOp *op);
void kiln_destroy_kernel(void *kernel);

/* A version-1 custom op: its own callbacks, the shared rest. */
#define KILN_CUSTOM_OP(CREATE, NAME, INPUT_TYPE, INPUT_COUNT, OUTPUT_TYPE, OUTPUT_COUNT, COMPUTE)                 \
  {API_VERSION, CREATE, NAME, kiln_on_cpu, INPUT_TYPE, INPUT_COUNT, OUTPUT_TYPE, OUTPUT_COUNT, COMPUTE,          \
   kiln_destroy_kernel, kiln_required, kiln_required, kiln_default_memory, kiln_one, kiln_one, kiln_one, kiln_one, \
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL}

/* A version-16 custom op: created and run by the callbacks that return a status (KernelCompute NULL). */
#define KILN_CUSTOM_OP_THAT_CAN_FAIL(CREATE, NAME, INPUT_TYPE, INPUT_COUNT, OUTPUT_TYPE, OUTPUT_COUNT, COMPUTE)      \
  {CAN_FAIL_API_VERSION, NULL, NAME, kiln_on_cpu, INPUT_TYPE, INPUT_COUNT, OUTPUT_TYPE, OUTPUT_COUNT, NULL,         \
   kiln_destroy_kernel, kiln_required, kiln_required, kiln_default_memory, kiln_one, kiln_one, kiln_one, kiln_one, \
   CREATE, COMPUTE, NULL, NULL, NULL, NULL, NULL, NULL, NULL}

/* Whether a call failed (releasing its status: a version-1 kernel cannot return one). */
int kiln_failed(const OrtApi *api, OrtStatus *status);

/* An input's shape, up to 16 dimensions; 0 on success. */
int kiln_input_shape(const OrtApi *api, const OrtValue *value, int64_t dims[16], size_t *rank);

/* The widest instruction set a kernel may use here: AVX-512, AVX2 with FMA, or plain C. The named
   environment variable (avx2|plain) asks for a narrower one, so the tests check every form a machine
   has. */
typedef enum { ISA_PLAIN, ISA_AVX2, ISA_AVX512 } KilnIsa;
KilnIsa kiln_isa(const char *variable);

/* Whether onnxruntime serves the table up to KernelContext_ParallelFor (set at registration). */
extern int kiln_has_parallel_for;

/* The ops of each file, registered by kernels.c. */
extern OrtCustomOp *const kiln_row_quantize_ops[5];
extern OrtCustomOp *const kiln_attention_ops[1];
extern OrtCustomOp *const kiln_layer_norm_ops[1];

#endif
