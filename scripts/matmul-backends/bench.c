/* f32 and bf16 matmul rates of one BLAS backend at SmolLM2-135M's shapes, in the orientations `safe` uses:
 * decoding (x·Wᵀ at 1-16 rows, the layers and the LM head apart) and training (x·Wᵀ forward, dy·W and dyᵀ·x
 * backward, at 128-4096 rows, every layer shape weighted by its count in the model). Built and run by
 * scripts/matmul-backends.sh against OpenBLAS, MKL or oneDNN (-DBACKEND_OPENBLAS / _MKL / _DNNL); prints one
 * JSON line per workload with the median GFLOP/s of 7 timed repeats. bf16 = bf16 inputs, f32 accumulation and
 * output (what a bf16 linear layer with f32 master weights needs). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef uint16_t bf16;

#if defined(BACKEND_OPENBLAS)
#include <cblas.h>
#define NAME "openblas"
#define CBLAS_SGEMM
static int b_bgemm(int ta, int tb, int m, int n, int k, const bf16 *a, int lda, const bf16 *b, int ldb, float *c,
                 int ldc) {
#ifdef NO_SBGEMM /* Debian's OpenBLAS is built without BUILD_BFLOAT16 */
  (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)ldc;
  return -1;
#else
  cblas_sbgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, 1.f, a, lda,
               b, ldb, 0.f, c, ldc);
  return 0;
#endif
}
static void backend_init(int threads) { openblas_set_num_threads(threads); }
#elif defined(BACKEND_MKL)
#include <mkl.h>
#define NAME "mkl"
#define CBLAS_SGEMM
static int b_bgemm(int ta, int tb, int m, int n, int k, const bf16 *a, int lda, const bf16 *b, int ldb, float *c,
                 int ldc) {
  cblas_gemm_bf16bf16f32(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, 1.f,
                         (const MKL_BF16 *)a, lda, (const MKL_BF16 *)b, ldb, 0.f, c, ldc);
  return 0;
}
static void backend_init(int threads) { mkl_set_num_threads(threads); }
#elif defined(BACKEND_DNNL)
#include <oneapi/dnnl/dnnl.h>
#define NAME "onednn"
static dnnl_engine_t engine;
static dnnl_stream_t stream;
static void b_sgemm(int ta, int tb, int m, int n, int k, const float *a, int lda, const float *b, int ldb, float *c,
                  int ldc) {
  dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, 1.f, a, lda, b, ldb, 0.f, c, ldc);
}
/* The matmul primitive, made once per shape (a real integration keeps them in a cache keyed by shape). */
#define CACHE 256
static struct { int ta, tb, m, n, k; const void *a, *b; void *c; dnnl_primitive_t p; dnnl_memory_t ma, mb, mc; } cache[CACHE];
static int cached;
static int b_bgemm(int ta, int tb, int m, int n, int k, const bf16 *a, int lda, const bf16 *b, int ldb, float *c,
                 int ldc) {
  int i;
  for (i = 0; i < cached; i++)
    if (cache[i].ta == ta && cache[i].tb == tb && cache[i].m == m && cache[i].n == n && cache[i].k == k &&
        cache[i].a == a && cache[i].b == b && cache[i].c == c)
      break;
  if (i == cached) {
    if (cached == CACHE) return 1;
    dnnl_memory_desc_t da, db, dc;
    dnnl_dims_t sa = {m, k}, sb = {k, n}, sc = {m, n};
    dnnl_dims_t stra = {ta ? 1 : lda, ta ? lda : 1}, strb = {tb ? 1 : ldb, tb ? ldb : 1}, strc = {ldc, 1};
    dnnl_memory_desc_init_by_strides(&da, 2, sa, dnnl_bf16, stra);
    dnnl_memory_desc_init_by_strides(&db, 2, sb, dnnl_bf16, strb);
    dnnl_memory_desc_init_by_strides(&dc, 2, sc, dnnl_f32, strc);
    dnnl_matmul_desc_t md;
    if (dnnl_matmul_desc_init(&md, &da, &db, NULL, &dc) != dnnl_success) return 2;
    dnnl_primitive_desc_t pd;
    if (dnnl_primitive_desc_create(&pd, &md, NULL, engine, NULL) != dnnl_success) return 3;
    if (dnnl_primitive_create(&cache[i].p, pd) != dnnl_success) return 4;
    dnnl_primitive_desc_destroy(pd);
    dnnl_memory_create(&cache[i].ma, &da, engine, (void *)a);
    dnnl_memory_create(&cache[i].mb, &db, engine, (void *)b);
    dnnl_memory_create(&cache[i].mc, &dc, engine, c);
    cache[i].ta = ta, cache[i].tb = tb, cache[i].m = m, cache[i].n = n, cache[i].k = k;
    cache[i].a = a, cache[i].b = b, cache[i].c = c;
    cached++;
  }
  dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, cache[i].ma}, {DNNL_ARG_WEIGHTS, cache[i].mb}, {DNNL_ARG_DST, cache[i].mc}};
  if (dnnl_primitive_execute(cache[i].p, stream, 3, args) != dnnl_success) return 5;
  dnnl_stream_wait(stream);
  return 0;
}
static void backend_init(int threads) {
  (void)threads; /* OMP_NUM_THREADS */
  dnnl_engine_create(&engine, dnnl_cpu, 0);
  dnnl_stream_create(&stream, engine, dnnl_stream_default_flags);
}
#else
#error "define BACKEND_OPENBLAS, BACKEND_MKL or BACKEND_DNNL"
#endif

#ifdef CBLAS_SGEMM /* OpenBLAS and MKL: the CBLAS call */
static void b_sgemm(int ta, int tb, int m, int n, int k, const float *a, int lda, const float *b, int ldb, float *c,
                    int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, 1.f, a, lda,
              b, ldb, 0.f, c, ldc);
}
#endif

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *x, const void *y) {
  double a = *(const double *)x, b = *(const double *)y;
  return (a > b) - (a < b);
}

static bf16 to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (bf16)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* (in, out, count) of SmolLM2-135M: per layer q,o 576→576; k,v 576→192; gate,up 576→1536; down 1536→576; 30
 * layers; the tied LM head 576→49152. */
static const int LAYER[][3] = {{576, 576, 60}, {576, 192, 60}, {576, 1536, 60}, {1536, 576, 30}};
static const int HEAD[3] = {576, 49152, 1};

static float *fbuf(size_t n) {
  float *p = aligned_alloc(64, (n * 4 + 63) / 64 * 64);
  for (size_t i = 0; i < n; i++) p[i] = (float)rand() / RAND_MAX - 0.5f;
  return p;
}
static bf16 *bbuf(const float *f, size_t n) {
  bf16 *p = aligned_alloc(64, (n * 2 + 63) / 64 * 64);
  for (size_t i = 0; i < n; i++) p[i] = to_bf16(f[i]);
  return p;
}

/* One pass over `shapes` at `rows` rows: forward only (train = 0) or forward and both backward products. */
static int pass(int bf, int train, int rows, const int (*shapes)[3], int nshapes, float **w, bf16 **wb, float *x,
                bf16 *xb, float *y, bf16 *yb, float *out) {
  for (int s = 0; s < nshapes; s++) {
    int k = shapes[s][0], n = shapes[s][1], count = shapes[s][2];
    /* the count is applied as a weight in rate(), not repeated: the same shapes cost the same */
    (void)count;
    if (bf) {
      int e = b_bgemm(0, 1, rows, n, k, xb, k, wb[s], k, out, n);
      if (!e && train) e = b_bgemm(0, 0, rows, k, n, yb, n, wb[s], k, out, k);
      if (!e && train) e = b_bgemm(1, 0, n, k, rows, yb, n, xb, k, out, k);
      if (e) return e;
    } else {
      b_sgemm(0, 1, rows, n, k, x, k, w[s], k, out, n);
      if (train) b_sgemm(0, 0, rows, k, n, y, n, w[s], k, out, k);
      if (train) b_sgemm(1, 0, n, k, rows, y, n, x, k, out, k);
    }
  }
  return 0;
}

/* Median GFLOP/s of 7 repeats; each shape is timed apart and weighted by its count. */
static double rate(int bf, int train, int rows, const int (*shapes)[3], int nshapes) {
  int maxk = 0, maxn = 0;
  for (int s = 0; s < nshapes; s++) {
    if (shapes[s][0] > maxk) maxk = shapes[s][0];
    if (shapes[s][1] > maxn) maxn = shapes[s][1];
  }
  int maxd = maxk > maxn ? maxk : maxn;
  float *w[8];
  bf16 *wb[8];
  for (int s = 0; s < nshapes; s++) {
    w[s] = fbuf((size_t)shapes[s][0] * shapes[s][1]);
    wb[s] = bbuf(w[s], (size_t)shapes[s][0] * shapes[s][1]);
  }
  float *x = fbuf((size_t)rows * maxk), *y = fbuf((size_t)rows * maxn);
  bf16 *xb = bbuf(x, (size_t)rows * maxk), *yb = bbuf(y, (size_t)rows * maxn);
  size_t outn = (size_t)rows * maxd;
  if ((size_t)maxk * maxn > outn) outn = (size_t)maxk * maxn;
  float *out = fbuf(outn);
  double times[7], flops = 0, secs = 0;
  for (int s = 0; s < nshapes; s++) {
    int one[1][3] = {{shapes[s][0], shapes[s][1], 1}};
    float *ws[1] = {w[s]};
    bf16 *wbs[1] = {wb[s]};
    if (pass(bf, train, rows, (const int(*)[3])one, 1, ws, wbs, x, xb, y, yb, out)) return -1;
    int iters = 1;
    double t0 = now();
    while (now() - t0 < 0.05) {
      pass(bf, train, rows, (const int(*)[3])one, 1, ws, wbs, x, xb, y, yb, out);
      iters++;
    }
    for (int r = 0; r < 7; r++) {
      double t = now();
      for (int i = 0; i < iters; i++) pass(bf, train, rows, (const int(*)[3])one, 1, ws, wbs, x, xb, y, yb, out);
      times[r] = (now() - t) / iters;
    }
    qsort(times, 7, sizeof(double), cmp);
    secs += shapes[s][2] * times[3];
    flops += shapes[s][2] * (train ? 3.0 : 1.0) * 2.0 * rows * shapes[s][0] * shapes[s][1];
  }
  for (int s = 0; s < nshapes; s++) free(w[s]), free(wb[s]);
  free(x), free(y), free(xb), free(yb), free(out);
  return flops / secs / 1e9;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 2;
  backend_init(threads);
  const int decode_rows[] = {1, 4, 8, 16}, train_rows[] = {128, 1024, 4096};
  for (int bf = 0; bf < 2; bf++) {
    if (bf && b_bgemm(0, 1, 1, 1, 1, (bf16[]){0}, 1, (bf16[]){0}, 1, (float[]){0}, 1)) {
      printf("{\"backend\": \"%s\", \"dtype\": \"bf16\", \"unavailable\": true}\n", NAME);
      continue;
    }
    for (int i = 0; i < 4; i++) {
      printf("{\"backend\": \"%s\", \"dtype\": \"%s\", \"work\": \"decode layers\", \"rows\": %d, \"gflops\": %.1f}\n",
             NAME, bf ? "bf16" : "f32", decode_rows[i], rate(bf, 0, decode_rows[i], LAYER, 4));
      printf("{\"backend\": \"%s\", \"dtype\": \"%s\", \"work\": \"decode head\", \"rows\": %d, \"gflops\": %.1f}\n",
             NAME, bf ? "bf16" : "f32", decode_rows[i], rate(bf, 0, decode_rows[i], &HEAD, 1));
      fflush(stdout);
    }
    for (int i = 0; i < 3; i++) {
      int all[5][3];
      memcpy(all, LAYER, sizeof LAYER);
      memcpy(all[4], HEAD, sizeof HEAD);
      printf("{\"backend\": \"%s\", \"dtype\": \"%s\", \"work\": \"train fwd+bwd\", \"rows\": %d, \"gflops\": %.1f}\n",
             NAME, bf ? "bf16" : "f32", train_rows[i], rate(bf, 1, train_rows[i], (const int(*)[3])all, 5));
      fflush(stdout);
    }
  }
  return 0;
}
