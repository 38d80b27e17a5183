/* bf16 products through oneDNN's matmul primitive, for src/model/onednn.rs (cargo feature `onednn`).
 *
 * oneDNN 2.6 (Debian's libdnnl-dev) has a BLAS-style call for f32 (dnnl_sgemm) but none for bf16, and its C API
 * describes memory with large structs that Rust would have to mirror field by field; this shim keeps them on the
 * C side. One call is one row block of a product on the calling thread: `C = op(A)·op(B)` with bf16 A, B and C,
 * accumulated in f32 (oneDNN's bf16 kernels: AVX512-BF16 or AMX where the CPU has them).
 *
 * Each calling thread keeps its own stream, its own cache of primitives keyed by shape and strides (a primitive
 * is made once per shape: oneDNN JIT-compiles it) and its own scratchpad (user-managed, so no primitive shares
 * one across threads). The caller makes each of its threads single-threaded for oneDNN (omp_set_num_threads(1)).
 */
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static dnnl_engine_t engine;
static dnnl_status_t engine_status;
static pthread_once_t engine_once = PTHREAD_ONCE_INIT;
static void make_engine(void) { engine_status = dnnl_engine_create(&engine, dnnl_cpu, 0); }

#define SLOTS 64
typedef struct {
  int used, ta, tb;
  int64_t m, n, k, lda, ldb, ldc;
  dnnl_primitive_t prim;
  dnnl_memory_desc_t da, db, dc, dscratch;
  size_t scratch_bytes;
} slot_t;

typedef struct {
  dnnl_stream_t stream;
  slot_t *slots; /* SLOTS of them */
  int next;      /* the slot a miss replaces when all are used */
  void *scratch;
  size_t scratch_cap;
} thread_state_t;

static __thread thread_state_t state;

/* Returns 0, or a status: oneDNN's (dnnl_unimplemented = 3 where the CPU has no bf16 kernel) + 100 for this
 * shim's own failures (allocation). */
static int make_slot(slot_t *s, int ta, int tb, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                     int64_t ldc) {
  dnnl_dims_t sa = {m, k}, sb = {k, n}, sc = {m, n};
  dnnl_dims_t stra = {ta ? 1 : lda, ta ? lda : 1}, strb = {tb ? 1 : ldb, tb ? ldb : 1}, strc = {ldc, 1};
  dnnl_status_t st;
  if ((st = dnnl_memory_desc_init_by_strides(&s->da, 2, sa, dnnl_bf16, stra)) != dnnl_success) return st;
  if ((st = dnnl_memory_desc_init_by_strides(&s->db, 2, sb, dnnl_bf16, strb)) != dnnl_success) return st;
  if ((st = dnnl_memory_desc_init_by_strides(&s->dc, 2, sc, dnnl_bf16, strc)) != dnnl_success) return st;
  dnnl_matmul_desc_t md;
  if ((st = dnnl_matmul_desc_init(&md, &s->da, &s->db, NULL, &s->dc)) != dnnl_success) return st;
  dnnl_primitive_attr_t attr;
  if ((st = dnnl_primitive_attr_create(&attr)) != dnnl_success) return st;
  dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
  dnnl_primitive_desc_t pd;
  st = dnnl_primitive_desc_create(&pd, &md, attr, engine, NULL);
  dnnl_primitive_attr_destroy(attr);
  if (st != dnnl_success) return st;
  s->dscratch = *dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
  s->scratch_bytes = dnnl_memory_desc_get_size(&s->dscratch);
  st = dnnl_primitive_create(&s->prim, pd);
  dnnl_primitive_desc_destroy(pd);
  if (st != dnnl_success) return st;
  s->used = 1, s->ta = ta, s->tb = tb, s->m = m, s->n = n, s->k = k, s->lda = lda, s->ldb = ldb, s->ldc = ldc;
  return 0;
}

static slot_t *find_slot(int ta, int tb, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                         int *err) {
  for (int i = 0; i < SLOTS; i++) {
    slot_t *s = &state.slots[i];
    if (s->used && s->ta == ta && s->tb == tb && s->m == m && s->n == n && s->k == k && s->lda == lda &&
        s->ldb == ldb && s->ldc == ldc)
      return s;
  }
  slot_t *s = &state.slots[state.next];
  state.next = (state.next + 1) % SLOTS;
  if (s->used) dnnl_primitive_destroy(s->prim);
  memset(s, 0, sizeof *s);
  *err = make_slot(s, ta, tb, m, n, k, lda, ldb, ldc);
  return *err ? NULL : s;
}

/* C (m × n, row stride ldc) = op(A)·op(B): A is m × k (row stride lda) or, with ta, k × m read transposed; B is
 * k × n (row stride ldb) or, with tb, n × k read transposed. All bf16 (uint16_t bits). */
int safe_dnnl_bf16_matmul(int ta, int tb, int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t lda,
                          const uint16_t *b, int64_t ldb, uint16_t *c, int64_t ldc) {
  pthread_once(&engine_once, make_engine);
  if (engine_status != dnnl_success) return engine_status;
  if (!state.slots) {
    state.slots = calloc(SLOTS, sizeof(slot_t));
    if (!state.slots) return 101;
    dnnl_status_t st = dnnl_stream_create(&state.stream, engine, dnnl_stream_default_flags);
    if (st != dnnl_success) {
      free(state.slots);
      state.slots = NULL;
      return st;
    }
  }
  int err = 0;
  slot_t *s = find_slot(ta, tb, m, n, k, lda, ldb, ldc, &err);
  if (!s) return err;
  if (s->scratch_bytes > state.scratch_cap) {
    free(state.scratch);
    state.scratch = aligned_alloc(64, (s->scratch_bytes + 63) / 64 * 64);
    state.scratch_cap = state.scratch ? s->scratch_bytes : 0;
    if (!state.scratch) return 102;
  }
  dnnl_memory_t ma, mb, mc, ms;
  dnnl_status_t st;
  if ((st = dnnl_memory_create(&ma, &s->da, engine, (void *)a)) != dnnl_success) return st;
  if ((st = dnnl_memory_create(&mb, &s->db, engine, (void *)b)) != dnnl_success) {
    dnnl_memory_destroy(ma);
    return st;
  }
  if ((st = dnnl_memory_create(&mc, &s->dc, engine, c)) != dnnl_success) {
    dnnl_memory_destroy(ma), dnnl_memory_destroy(mb);
    return st;
  }
  if ((st = dnnl_memory_create(&ms, &s->dscratch, engine, state.scratch)) != dnnl_success) {
    dnnl_memory_destroy(ma), dnnl_memory_destroy(mb), dnnl_memory_destroy(mc);
    return st;
  }
  dnnl_exec_arg_t args[4] = {
      {DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}, {DNNL_ARG_SCRATCHPAD, ms}};
  st = dnnl_primitive_execute(s->prim, state.stream, 4, args);
  if (st == dnnl_success) st = dnnl_stream_wait(state.stream);
  dnnl_memory_destroy(ma), dnnl_memory_destroy(mb), dnnl_memory_destroy(mc), dnnl_memory_destroy(ms);
  return st;
}

/* The implementation oneDNN picks for a bf16 product of 128 × 576 by 576 × 576 on this CPU ("ref:any" where it
 * has no bf16 kernel), NUL-terminated into name[len]; 0 or a status. */
int safe_dnnl_bf16_impl(char *name, int len) {
  pthread_once(&engine_once, make_engine);
  if (engine_status != dnnl_success) return engine_status;
  if (len < 1) return 103;
  name[0] = 0;
  dnnl_dims_t sa = {128, 576}, sb = {576, 576}, sc = {128, 576};
  dnnl_memory_desc_t da, db, dc;
  dnnl_status_t st;
  if ((st = dnnl_memory_desc_init_by_tag(&da, 2, sa, dnnl_bf16, dnnl_ab)) != dnnl_success) return st;
  if ((st = dnnl_memory_desc_init_by_tag(&db, 2, sb, dnnl_bf16, dnnl_ba)) != dnnl_success) return st;
  if ((st = dnnl_memory_desc_init_by_tag(&dc, 2, sc, dnnl_bf16, dnnl_ab)) != dnnl_success) return st;
  dnnl_matmul_desc_t md;
  if ((st = dnnl_matmul_desc_init(&md, &da, &db, NULL, &dc)) != dnnl_success) return st;
  dnnl_primitive_desc_t pd;
  if ((st = dnnl_primitive_desc_create(&pd, &md, NULL, engine, NULL)) != dnnl_success) return st;
  const char *impl = NULL;
  st = dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
  if (st == dnnl_success && impl) {
    strncpy(name, impl, (size_t)len - 1);
    name[len - 1] = 0;
  }
  dnnl_primitive_desc_destroy(pd);
  return st;
}
