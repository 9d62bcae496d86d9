// lvllm CUDA kernels. Self-contained (no CUDA headers): bf16 is handled as bit
// patterns, so NVRTC compiles this with only the driver and NVRTC installed.
// Activations are f32; weights bf16 (unsigned short). Row-major everywhere.

typedef unsigned short bf16_t;

#define LV_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf2f(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }

__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                            // round to nearest even
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// out[t, :] = table[ids[t], :]   grid: tokens
extern "C" __global__ void embedding(const unsigned* ids, const bf16_t* table, float* out, int hidden) {
    const size_t row = (size_t)ids[blockIdx.x] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[(size_t)blockIdx.x * hidden + i] = bf2f(table[row + i]);
}

// out[r, :] = x[r, :] * rsqrt(mean(x[r]^2) + eps) * w   grid: rows, block: 256 (in place allowed)
extern "C" __global__ void rmsnorm(const float* x, const float* w, float* out, int width, float eps) {
    __shared__ float part[32];
    const float* xr = x + (size_t)blockIdx.x * width;
    float s = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += xr[i] * xr[i];
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(part[0] / (float)width + eps);
    float* o = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) o[i] = w[i] * (xr[i] * inv);
}

// out[i] = bf16(x[i])
extern "C" __global__ void to_bf16(const float* x, bf16_t* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f2bf(x[i]);
}

// x[i] += y[i]
extern "C" __global__ void add_inplace(float* x, const float* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// out[i] = silu(g[i]) * u[i]
extern "C" __global__ void silu_mul(const float* g, const float* u, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float a = g[i];
        out[i] = a / (1.f + expf(-a)) * u[i];
    }
}

// NeoX RoPE in place on x[t, heads, dim]; cos/sin from inv_freq × position × scaling.
// grid: tokens, block: 128
extern "C" __global__ void rope_neox(float* x, const int* positions, const float* inv_freq, float scaling, int heads, int dim) {
    const int half = dim / 2;
    const float p = (float)positions[blockIdx.x];
    float* xt = x + (size_t)blockIdx.x * heads * dim;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int h = i / half, j = i % half;
        const float a = p * inv_freq[j];
        const float c = cosf(a) * scaling, s = sinf(a) * scaling;
        float* hp = xt + h * dim;
        const float x1 = hp[j], x2 = hp[j + half];
        hp[j] = x1 * c - x2 * s;
        hp[j + half] = x2 * c + x1 * s;
    }
}

// Paged cache write: kc[slot[t], :] = k[t, :], same for v.  grid: tokens
extern "C" __global__ void kv_write(const float* k, const float* v, float* kc, float* vc, const int* slots, int width) {
    const size_t dst = (size_t)slots[blockIdx.x] * width, src = (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        kc[dst + i] = k[src + i];
        vc[dst + i] = v[src + i];
    }
}

// Causal attention over the paged cache, one warp per (token, head), online softmax.
// q/out: [T, n_heads, D]; kc/vc: [slots, n_kv, D]; token t of sequence seq[t] at
// position pos[t] attends to positions 0..=pos[t] through block_tables[seq, :].
// grid: (T, n_heads), block: 32. D ≤ 256.
#define ATT_WARPS 16
extern "C" __global__ void paged_attention(const float* q, const float* kc, const float* vc, float* out, const int* pos,
                                           const int* seq, const int* block_tables, int max_blocks, int block_size,
                                           int n_heads, int n_kv, int dim, float scale) {
    // One block of ATT_WARPS warps per (token, head): warp w takes positions
    // w, w + ATT_WARPS, ... with its own online softmax, then the warps' partial
    // results are merged through shared memory. The per-position loop is latency
    // bound, so spreading it over warps is what makes decode attention fast.
    const int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kvh = h / (n_heads / n_kv);
    const float* qh = q + ((size_t)t * n_heads + h) * dim;
    float qv[8], acc[8];
    const int per = (dim + 31) / 32;
    for (int i = 0; i < per; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < dim ? qh[d] * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -LV_INF, l = 0.f;
    const int* bt = block_tables + (size_t)seq[t] * max_blocks;
    const int last = pos[t];
    for (int j = w; j <= last; j += ATT_WARPS) {
        const size_t slot = (size_t)bt[j / block_size] * block_size + j % block_size;
        const float* kj = kc + (slot * n_kv + kvh) * dim;
        const float* vj = vc + (slot * n_kv + kvh) * dim;
        float s = 0.f;
        for (int i = 0; i < per; i++) {
            const int d = lane + 32 * i;
            if (d < dim) s += qv[i] * kj[d];
        }
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), pj = expf(s - m_new);
        l = l * corr + pj;
        for (int i = 0; i < per; i++) {
            const int d = lane + 32 * i;
            acc[i] = acc[i] * corr + (d < dim ? pj * vj[d] : 0.f);
        }
        m = m_new;
    }
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][256];
    if (lane == 0) {
        sm[w] = m;
        sl[w] = l;
    }
    for (int i = 0; i < per; i++) {
        const int d = lane + 32 * i;
        if (d < dim) sacc[w][d] = acc[i];
    }
    __syncthreads();
    float mx = -LV_INF;
    for (int v = 0; v < ATT_WARPS; v++) mx = fmaxf(mx, sm[v]);
    float total = 0.f;
    for (int v = 0; v < ATT_WARPS; v++) total += sl[v] > 0.f ? sl[v] * expf(sm[v] - mx) : 0.f;
    float* oh = out + ((size_t)t * n_heads + h) * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float s = 0.f;
        for (int v = 0; v < ATT_WARPS; v++)
            if (sl[v] > 0.f) s += sacc[v][d] * expf(sm[v] - mx);
        oh[d] = s / total;
    }
}

// Softmax top-k routing per token: one thread per token.
extern "C" __global__ void router_topk(const float* logits, int n_tokens, int n_experts, int k, int renormalize,
                                       int* ids, float* weights) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_tokens) return;
    const float* lg = logits + (size_t)t * n_experts;
    float mx = -LV_INF;
    for (int e = 0; e < n_experts; e++) mx = fmaxf(mx, lg[e]);
    float z = 0.f;
    for (int e = 0; e < n_experts; e++) z += expf(lg[e] - mx);
    float sum = 0.f;
    int prev = -1;
    float prev_v = LV_INF;
    for (int j = 0; j < k; j++) {
        // Next largest after (prev_v, prev): ties keep the lower index first.
        int best = -1;
        float bv = -LV_INF;
        for (int e = 0; e < n_experts; e++) {
            const float v = lg[e];
            const bool after = v < prev_v || (v == prev_v && e > prev);
            if (after && (best < 0 || v > bv)) { best = e; bv = v; }
        }
        ids[t * k + j] = best;
        const float p = expf(bv - mx) / z;
        weights[t * k + j] = p;
        sum += p;
        prev = best;
        prev_v = bv;
    }
    if (renormalize) for (int j = 0; j < k; j++) weights[t * k + j] /= sum;
}

// out[r, :] = x[idx[r], :]   grid: rows
extern "C" __global__ void gather_rows(const float* x, const int* idx, float* out, int width) {
    const size_t src = (size_t)idx[blockIdx.x] * width, dst = (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) out[dst + i] = x[src + i];
}

// out[idx[r], :] += w[r] * y[r, :]   grid: rows (idx distinct within a launch)
extern "C" __global__ void scatter_add_weighted(const float* y, const int* idx, const float* w, float* out, int width) {
    const size_t dst = (size_t)idx[blockIdx.x] * width, src = (size_t)blockIdx.x * width;
    const float s = w[blockIdx.x];
    for (int i = threadIdx.x; i < width; i += blockDim.x) out[dst + i] += s * y[src + i];
}

// Deterministic pseudo-random bf16 weights in [-scale, scale) (load_format: dummy).
extern "C" __global__ void fill_random_bf16(bf16_t* p, long long n, unsigned seed, float scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        unsigned x = (unsigned)i * 2654435761u ^ seed;
        x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
        p[i] = f2bf(((float)(x >> 8) / 16777216.f * 2.f - 1.f) * scale);
    }
}

// Two-term bf16 split of f32 activations: out[0..n) = hi = bf16(x),
// out[n..2n) = bf16(x - hi). A GEMM over both halves, summed, sees ~16 mantissa
// bits of x while reading the bf16 weights once.
extern "C" __global__ void split_bf16(const float* x, bf16_t* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const bf16_t hi = f2bf(x[i]);
        out[i] = hi;
        out[n + i] = f2bf(x[i] - bf2f(hi));
    }
}

// y[i] = y2[i] + y2[n + i]
extern "C" __global__ void sum_halves(const float* y2, float* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = y2[i] + y2[n + i];
}

#define GEMV_MAX_T 16

// Loads 8 bf16 weights (16 bytes) as f32.
__device__ __forceinline__ void load8(const bf16_t* p, float* w) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        w[2 * i] = __uint_as_float(u[i] << 16);
        w[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
}

// acc[t] += x[t, k0..k0+8] · w[0..8] for rows t < T.
__device__ __forceinline__ void fma8_rows(const float* x, long long x_stride, int k0, const float* w, float* acc, int T) {
#pragma unroll
    for (int t = 0; t < GEMV_MAX_T; t++) {
        if (t < T) {
            const float* xr = x + t * x_stride + k0;
            const float4 a = *reinterpret_cast<const float4*>(xr);
            const float4 b = *reinterpret_cast<const float4*>(xr + 4);
            acc[t] += a.x * w[0] + a.y * w[1] + a.z * w[2] + a.w * w[3] + b.x * w[4] + b.y * w[5] + b.z * w[6] + b.w * w[7];
        }
    }
}

// One warp computes y[r, n] = Σ_k x[r, k] · w[n, k] for rows r < T of x
// (x rows `x_stride` apart). f32 activations, bf16 weights, f32 accumulation.
__device__ __forceinline__ void warp_gemv_row(const float* x, long long x_stride, const bf16_t* wr, float* acc, int T, int K) {
    const int lane = threadIdx.x & 31;
    if ((K & 7) == 0) {
        // Four 16-byte weight loads are issued before any is used, so each lane
        // keeps several requests in flight (a single load per iteration leaves
        // the loop latency bound, far below the memory bandwidth). The sums are
        // accumulated chunk by chunk in the same order as one chunk at a time.
        int k0 = lane * 8;
        for (; k0 + 768 < K; k0 += 1024) {
            float w[4][8];
#pragma unroll
            for (int u = 0; u < 4; u++) load8(wr + k0 + u * 256, w[u]);
#pragma unroll
            for (int u = 0; u < 4; u++) fma8_rows(x, x_stride, k0 + u * 256, w[u], acc, T);
        }
        for (; k0 < K; k0 += 256) {
            float w[8];
            load8(wr + k0, w);
            fma8_rows(x, x_stride, k0, w, acc, T);
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            const float wk = bf2f(wr[k]);
#pragma unroll
            for (int t = 0; t < GEMV_MAX_T; t++)
                if (t < T) acc[t] += x[t * x_stride + k] * wk;
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_T; t++)
        if (t < T) acc[t] = warp_sum(acc[t]);
}

// y[t, n] = Σ_k x[t, k] · w[n, k] for T ≤ 16 tokens.  grid: ⌈N/8⌉, block: 256 (a warp per row)
extern "C" __global__ void gemv_bf16(const float* x, const bf16_t* w, float* y, int T, int N, int K) {
    const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (n >= N) return;
    float acc[GEMV_MAX_T];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_T; t++) acc[t] = 0.f;
    warp_gemv_row(x, K, w + (size_t)n * K, acc, T, K);
    if ((threadIdx.x & 31) == 0)
        for (int t = 0; t < T; t++) y[(size_t)t * N + n] = acc[t];
}

// Routed expert rows: for slot s (token s / topk, expert ids[s]),
// y[s, n] = Σ_k x[row, k] · w[ids[s], n, k] where row = s / topk, or s when
// x_per_slot.  w: [E, N, K].  grid: (⌈N/8⌉, S), block: 256
extern "C" __global__ void moe_gemv_bf16(const float* x, const bf16_t* w, const int* ids, float* y, int N, int K,
                                         int topk, int x_per_slot) {
    const int n = blockIdx.x * 8 + (threadIdx.x >> 5), s = blockIdx.y;
    if (n >= N) return;
    const int row = x_per_slot ? s : s / topk;
    float acc[GEMV_MAX_T];
    acc[0] = 0.f;
    warp_gemv_row(x + (size_t)row * K, K, w + ((size_t)ids[s] * N + n) * K, acc, 1, K);
    if ((threadIdx.x & 31) == 0) y[(size_t)s * N + n] = acc[0];
}

// out[t, :] += Σ_j wts[t·k + j] · y[t·k + j, :]   grid: tokens
extern "C" __global__ void moe_combine_add(const float* y, const float* wts, float* out, int k, int width) {
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float s = 0.f;
        for (int j = 0; j < k; j++) s += wts[t * k + j] * y[((size_t)t * k + j) * width + i];
        out[(size_t)t * width + i] += s;
    }
}

// Hybrid MoE handoff, GPU side, fused with the router's softmax top-k: copies
// the normed hidden states `a` into the mapped host region, writes each token's
// top-k ids and weights there (thread t < n_tokens routes token t; k ≤ 32),
// clears the layer's done flag and records n_tokens, so the stream-ordered
// doorbell write that follows publishes all of it at once.
extern "C" __global__ void router_topk_handoff(const float* logits, const float* a, int n_tokens, int n_experts, int k,
                                               int renormalize, int h, int* dst_ids, float* dst_w, float* dst_h,
                                               volatile unsigned* done, unsigned* n_out) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = tid; i < (long long)n_tokens * h; i += stride) dst_h[i] = a[i];
    if (tid < n_tokens) {
        const int t = (int)tid;
        const float* lg = logits + (size_t)t * n_experts;
        float mx = -LV_INF;
        for (int e = 0; e < n_experts; e++) mx = fmaxf(mx, lg[e]);
        float z = 0.f;
        for (int e = 0; e < n_experts; e++) z += expf(lg[e] - mx);
        int ids[32];
        float ws[32];
        float sum = 0.f;
        int prev = -1;
        float prev_v = LV_INF;
        for (int j = 0; j < k; j++) {
            int best = -1;
            float bv = -LV_INF;
            for (int e = 0; e < n_experts; e++) {
                const float v = lg[e];
                const bool after = v < prev_v || (v == prev_v && e > prev);
                if (after && (best < 0 || v > bv)) { best = e; bv = v; }
            }
            ids[j] = best;
            ws[j] = expf(bv - mx) / z;
            sum += ws[j];
            prev = best;
            prev_v = bv;
        }
        for (int j = 0; j < k; j++) {
            dst_ids[t * k + j] = ids[j];
            dst_w[t * k + j] = renormalize ? ws[j] / sum : ws[j];
        }
    }
    if (tid == 0) {
        *done = 0u;
        *n_out = (unsigned)n_tokens;
    }
}

// x += y where y lives in mapped host memory that the CPU rewrites between
// reads: `ld.global.cv` fetches it again instead of trusting a cached line.
extern "C" __global__ void add_from_host(float* x, const float* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += __ldcv(y + i);
}
