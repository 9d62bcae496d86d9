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

// Causal attention over the paged cache, one block of ATT_WARPS warps per (token, head), online softmax.
// q/out: [T, n_heads, D]; kc/vc: [slots, n_kv, D]; token t of sequence seq[t] at
// position pos[t] attends to positions 0..=pos[t] through block_tables[seq, :].
// grid: (T, n_heads), block: 32·ATT_WARPS = 1024. D ≤ 256.
#define ATT_WARPS 32
extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS) paged_attention(const float* q, const float* kc, const float* vc, float* out, const int* pos,
                                           const int* seq, const int* block_tables, int max_blocks, int block_size,
                                           int n_heads, int n_kv, int dim, float scale) {
    // One block of ATT_WARPS warps per (token, head): warp w takes positions
    // w, w + ATT_WARPS, ... with its own online softmax, then the warps' partial
    // results are merged through shared memory. The per-position loop is latency
    // bound, so spreading it over warps is what makes decode attention fast; a
    // position's K and V rows are both loaded before its score is reduced, so
    // their latencies overlap. Fixed-size unrolled loops keep the per-lane
    // arrays in registers.
    const int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int kvh = h / (n_heads / n_kv);
    const float* qh = q + ((size_t)t * n_heads + h) * dim;
    float qv[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
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
        float kr[8], vr[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int d = lane + 32 * i;
            kr[i] = d < dim ? kj[d] : 0.f;
            vr[i] = d < dim ? vj[d] : 0.f;
        }
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (lane + 32 * i < dim) s += qv[i] * kr[i];
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), pj = expf(s - m_new);
        l = l * corr + pj;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] = acc[i] * corr + (lane + 32 * i < dim ? pj * vr[i] : 0.f);
        m = m_new;
    }
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][256];
    if (lane == 0) {
        sm[w] = m;
        sl[w] = l;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
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

// Most experts a router kernel takes: TOPK_PER_LANE per lane of one warp.
#define TOPK_PER_LANE 16

// Softmax top-k of one token's logits by one warp (n_experts ≤ 32·PL, k ≤ 32):
// lane l holds experts l, l + 32, ...; each of the k rounds takes the largest
// remaining logit (ties: the lower expert index first) by a warp reduction.
// Lane 0..k-1 write ids[j] and weights[j] (softmax probability, renormalised
// over the k when asked). PL only bounds the per-lane slots scanned each round
// (the result does not depend on it): see warp_topk.
template <int PL>
__device__ __forceinline__ void warp_topk_pl(const float* lg, int n_experts, int k, int renormalize, int* ids,
                                             float* weights) {
    const int lane = threadIdx.x & 31;
    float v[PL];
    float mx = -LV_INF;
#pragma unroll
    for (int j = 0; j < PL; j++) {
        const int e = lane + 32 * j;
        v[j] = e < n_experts ? __ldcg(lg + e) : -LV_INF;
        mx = fmaxf(mx, v[j]);
    }
    mx = warp_max(mx);
    float z = 0.f;
#pragma unroll
    for (int j = 0; j < PL; j++)
        if (lane + 32 * j < n_experts) z += expf(v[j] - mx);
    z = warp_sum(z);
    unsigned taken = 0u;
    float sum = 0.f, my_p = 0.f;
    int my_id = 0;
    for (int r = 0; r < k; r++) {
        float bv = -LV_INF;
        int be = 0x7fffffff;
#pragma unroll
        for (int j = 0; j < PL; j++) {
            const int e = lane + 32 * j;
            if (e < n_experts && !((taken >> j) & 1u) && (be == 0x7fffffff || v[j] > bv)) {
                bv = v[j];
                be = e;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (oe != 0x7fffffff && (be == 0x7fffffff || ov > bv || (ov == bv && oe < be))) {
                bv = ov;
                be = oe;
            }
        }
        if ((be & 31) == lane) taken |= 1u << (be >> 5);
        const float p = expf(bv - mx) / z;
        sum += p;
        if (lane == r) {
            my_p = p;
            my_id = be;
        }
    }
    if (lane < k) {
        ids[lane] = my_id;
        weights[lane] = renormalize ? my_p / sum : my_p;
    }
}

// warp_topk_pl with as few slots per lane as n_experts needs (≤ 128 experts,
// as Qwen3-MoE has: 4 slots instead of 16, so each of the k serial rounds
// scans a quarter of them). The branch is uniform over the warp.
__device__ __forceinline__ void warp_topk(const float* lg, int n_experts, int k, int renormalize, int* ids,
                                          float* weights) {
    if (n_experts <= 32 * 4)
        warp_topk_pl<4>(lg, n_experts, k, renormalize, ids, weights);
    else if (n_experts <= 32 * 8)
        warp_topk_pl<8>(lg, n_experts, k, renormalize, ids, weights);
    else
        warp_topk_pl<TOPK_PER_LANE>(lg, n_experts, k, renormalize, ids, weights);
}

// Softmax top-k routing per token.  grid: tokens, block: 32 (one warp per token)
extern "C" __global__ void router_topk(const float* logits, int n_tokens, int n_experts, int k, int renormalize,
                                       int* ids, float* weights) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    warp_topk(logits + (size_t)t * n_experts, n_experts, k, renormalize, ids + t * k, weights + t * k);
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

// 8 bf16 weights (16 bytes, already loaded) as f32.
__device__ __forceinline__ void unpack8(const uint4 v, float* w) {
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        w[2 * i] = __uint_as_float(u[i] << 16);
        w[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
}

// acc[t] += x[t, k0..k0+8] · w[0..8] for rows t < T (≤ TM).
template <int TM>
__device__ __forceinline__ void fma8_rows(const float* x, long long x_stride, int k0, const float* w, float* acc, int T) {
#pragma unroll
    for (int t = 0; t < TM; t++) {
        if (t < T) {
            const float* xr = x + t * x_stride + k0;
            const float4 a = *reinterpret_cast<const float4*>(xr);
            const float4 b = *reinterpret_cast<const float4*>(xr + 4);
            acc[t] += a.x * w[0] + a.y * w[1] + a.z * w[2] + a.w * w[3] + b.x * w[4] + b.y * w[5] + b.z * w[6] + b.w * w[7];
        }
    }
}

// One warp computes y[r, n] = Σ_k x[r, k] · w[n, k] for rows r < T (≤ TM) of x
// (x rows `x_stride` apart). f32 activations, bf16 weights, f32 accumulation.
// TM is the kernel's compile-time row bound: TM = 1 (decode of one sequence)
// needs few registers, so its kernels fit more warps and load eight chunks ahead.
// The whole warp calls it (it ends with warp reductions).
template <int TM>
__device__ __forceinline__ void warp_gemv_row(const float* x, long long x_stride, const bf16_t* wr, float* acc, int T, int K) {
    const int lane = threadIdx.x & 31;
    constexpr int U = TM == 1 ? 8 : 4;
    if ((K & 7) == 0) {
        // U 16-byte weight loads are issued before any is used, so each lane
        // keeps several requests in flight (a single load per iteration leaves
        // the loop latency bound, far below the memory bandwidth). The sums are
        // accumulated chunk by chunk in k order whatever U is, so every TM gives
        // the same bits. (Eight loads ahead with TM = 16 measured slower on the
        // H200: fewer warps fit.)
        int k0 = lane * 8;
        for (; k0 + (U - 1) * 256 < K; k0 += U * 256) {
            uint4 raw[U];
#pragma unroll
            for (int u = 0; u < U; u++) raw[u] = *reinterpret_cast<const uint4*>(wr + k0 + u * 256);
#pragma unroll
            for (int u = 0; u < U; u++) {
                float w[8];
                unpack8(raw[u], w);
                fma8_rows<TM>(x, x_stride, k0 + u * 256, w, acc, T);
            }
        }
        for (; k0 < K; k0 += 256) {
            float w[8];
            unpack8(*reinterpret_cast<const uint4*>(wr + k0), w);
            fma8_rows<TM>(x, x_stride, k0, w, acc, T);
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            const float wk = bf2f(wr[k]);
#pragma unroll
            for (int t = 0; t < TM; t++)
                if (t < T) acc[t] += x[t * x_stride + k] * wk;
        }
    }
#pragma unroll
    for (int t = 0; t < TM; t++)
        if (t < T) acc[t] = warp_sum(acc[t]);
}

// Row n of y = x · wᵀ for T ≤ TM rows of x, by one warp: y[t, n] for t < T (y rows N apart).
template <int TM>
__device__ __forceinline__ void gemv_row_store(const float* x, const bf16_t* w, float* y, int n, int T, int N, int K) {
    float acc[TM];
#pragma unroll
    for (int t = 0; t < TM; t++) acc[t] = 0.f;
    warp_gemv_row<TM>(x, K, w + (size_t)n * K, acc, T, K);
    if ((threadIdx.x & 31) == 0) {
        // A compile-time bound keeps acc in registers (a runtime one put it in local memory).
#pragma unroll
        for (int t = 0; t < TM; t++)
            if (t < T) y[(size_t)t * N + n] = acc[t];
    }
}

// y[t, n] = Σ_k x[t, k] · w[n, k] for T ≤ TM tokens.  grid: ⌈N/8⌉, block: 256 (a warp per row)
template <int TM>
__device__ __forceinline__ void gemv_body(const float* x, const bf16_t* w, float* y, int T, int N, int K) {
    const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (n >= N) return;
    gemv_row_store<TM>(x, w, y, n, T, N, K);
}
extern "C" __global__ void gemv_bf16(const float* x, const bf16_t* w, float* y, int T, int N, int K) {
    gemv_body<GEMV_MAX_T>(x, w, y, T, N, K);
}
extern "C" __global__ void gemv_bf16_t1(const float* x, const bf16_t* w, float* y, int T, int N, int K) {
    gemv_body<1>(x, w, y, T, N, K);
}

// Routed expert rows: for slot s (token s / topk, expert ids[s]),
// y[s, n] = Σ_k x[row, k] · w[ids[s], n, k] where row = s / topk, or s when
// x_per_slot.  w: [E, N, K].  grid: (⌈N/8⌉, S), block: 256
extern "C" __global__ void moe_gemv_bf16(const float* x, const bf16_t* w, const int* ids, float* y, int N, int K,
                                         int topk, int x_per_slot) {
    const int n = blockIdx.x * 8 + (threadIdx.x >> 5), s = blockIdx.y;
    if (n >= N) return;
    const int row = x_per_slot ? s : s / topk;
    float acc[1] = {0.f};
    warp_gemv_row<1>(x + (size_t)row * K, K, w + ((size_t)ids[s] * N + n) * K, acc, 1, K);
    if ((threadIdx.x & 31) == 0) y[(size_t)s * N + n] = acc[0];
}

// out[t, :] += Σ_j wts[t·k + j] · y[t·k + j, :], summed in j order.
// grid: (tokens, ⌈width/256⌉), block: 256. A thread per element: its k loads of
// y are issued eight at a time before any is summed. As in warp_gemv_row,
// __syncwarp() keeps ptxas from sinking each load to its use (the weights,
// the same few words for every thread, are loaded after it so that no
// product can be hoisted above it), so every lane of the warp gets there
// (none returns early).
extern "C" __global__ void moe_combine_add(const float* y, const float* wts, float* out, int k, int width) {
    const int t = blockIdx.x, i = blockIdx.y * blockDim.x + threadIdx.x;
    const bool in = i < width;
    const float* yt = y + (size_t)t * k * width + i;
    const float* wt = wts + (size_t)t * k;
    float* ot = out + (size_t)t * width + i;
    const float o0 = in ? *ot : 0.f;
    float s = 0.f;
    for (int j0 = 0; j0 < k; j0 += 8) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) v[u] = in && j0 + u < k ? yt[(size_t)(j0 + u) * width] : 0.f;
        __syncwarp();
#pragma unroll
        for (int u = 0; u < 8; u++)
            if (j0 + u < k) s += wt[j0 + u] * v[u];
    }
    if (in) *ot = o0 + s;
}

// gemv_bf16 for up to three matrices sharing the input x (e.g. q, k and v): the
// grid's warps cover the rows of w0, then w1, then w2.  grid: ⌈(n0+n1+n2)/8⌉, block: 256
template <int TM>
__device__ __forceinline__ void gemv3_body(const float* x, int T, int K, const bf16_t* w0, float* y0, int n0,
                                           const bf16_t* w1, float* y1, int n1, const bf16_t* w2, float* y2, int n2) {
    int n = blockIdx.x * 8 + (threadIdx.x >> 5);
    const bf16_t* w = w0;
    float* y = y0;
    int N = n0;
    if (n >= n0) {
        n -= n0;
        w = w1;
        y = y1;
        N = n1;
        if (n >= n1) {
            n -= n1;
            w = w2;
            y = y2;
            N = n2;
            if (n >= n2) return;
        }
    }
    gemv_row_store<TM>(x, w, y, n, T, N, K);
}
extern "C" __global__ void gemv3_bf16(const float* x, int T, int K, const bf16_t* w0, float* y0, int n0, const bf16_t* w1,
                                      float* y1, int n1, const bf16_t* w2, float* y2, int n2) {
    gemv3_body<GEMV_MAX_T>(x, T, K, w0, y0, n0, w1, y1, n1, w2, y2, n2);
}
extern "C" __global__ void gemv3_bf16_t1(const float* x, int T, int K, const bf16_t* w0, float* y0, int n0,
                                         const bf16_t* w1, float* y1, int n1, const bf16_t* w2, float* y2, int n2) {
    gemv3_body<1>(x, T, K, w0, y0, n0, w1, y1, n1, w2, y2, n2);
}

// Sum of v over the block (blockDim a multiple of 32, ≤ 1024), returned to every thread.
__device__ __forceinline__ float block_sum(float v, float* part) {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float u = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
        u = warp_sum(u);
        if (threadIdx.x == 0) part[0] = u;
    }
    __syncthreads();
    return part[0];
}

// Decode's attention prologue in one launch, per (token t, head): q heads get
// RMSNorm(q_norm) then NeoX RoPE in place; k heads RMSNorm(k_norm), RoPE, and
// are written to the paged cache at slots[t]; v heads are copied to the cache.
// Same arithmetic as rmsnorm + rope_neox + kv_write.
// grid: (T, n_heads + 2·n_kv), block: 128. dim ≤ 256, even.
extern "C" __global__ void qk_norm_rope_kv(float* q, float* k, const float* v, const float* qw, const float* kw,
                                           const int* positions, const float* inv_freq, float scaling, float* kc,
                                           float* vc, const int* slots, int n_heads, int n_kv, int dim, float eps) {
    __shared__ float part[32];
    const int t = blockIdx.x, hh = blockIdx.y;
    const size_t slot = (size_t)slots[t];
    if (hh >= n_heads + n_kv) {
        const int h = hh - n_heads - n_kv;
        const float* src = v + ((size_t)t * n_kv + h) * dim;
        float* dst = vc + (slot * n_kv + h) * dim;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
        return;
    }
    const bool is_q = hh < n_heads;
    const int h = is_q ? hh : hh - n_heads;
    float* x = is_q ? q + ((size_t)t * n_heads + h) * dim : k + ((size_t)t * n_kv + h) * dim;
    const float* w = is_q ? qw : kw;
    float s = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += x[i] * x[i];
    const float inv = rsqrtf(block_sum(s, part) / (float)dim + eps);
    const int half = dim / 2;
    const float p = (float)positions[t];
    float* kdst = kc + (slot * n_kv + h) * dim;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const float x1 = w[j] * (x[j] * inv), x2 = w[j + half] * (x[j + half] * inv);
        const float a = p * inv_freq[j];
        const float c = cosf(a) * scaling, sn = sinf(a) * scaling;
        const float o1 = x1 * c - x2 * sn, o2 = x2 * c + x1 * sn;
        x[j] = o1;
        x[j + half] = o2;
        if (!is_q) {
            kdst[j] = o1;
            kdst[j + half] = o2;
        }
    }
}

// y[i] by y_mode: 0 plain, 1 mapped host memory (uncached), 2 written by other
// blocks of this kernel (L2 only).
__device__ __forceinline__ float load_y(const float* yr, int i, int y_mode) {
    return y_mode == 1 ? __ldcv(yr + i) : y_mode == 2 ? __ldcg(yr + i) : yr[i];
}

// add_rmsnorm_row keeps a row in registers, NORM_REGS elements per thread, when
// the block has NORM_BLOCK threads (how every launcher starts it: a
// compile-time stride lets one address register serve every element) and
// width ≤ NORM_REGS · NORM_BLOCK (2048); otherwise it takes a loop. (16 per
// thread cost gemv_add_rmsnorm_t1 91 registers, which its GEMV half pays.)
#define NORM_BLOCK 256
#define NORM_REGS 8

// One row of add_rmsnorm by the whole block (y read per y_mode, see load_y).
__device__ __forceinline__ void add_rmsnorm_row(float* xr, const float* yr, int y_mode, const float* w, float* o,
                                                int width, float eps, float* part) {
    // Every load of the row (y, x and the norm weight) is issued before any
    // store: from mapped host memory each y load is a PCIe round trip, and a
    // loop that loads, adds and stores element by element waits for each load
    // in turn (the compiler cannot move a load above a store that may alias
    // it). Thread i owns elements i, i + blockDim, ... in both passes, so x, y
    // and out may alias. Same arithmetic, in the same order, as add_inplace
    // then rmsnorm.
    const int tid = threadIdx.x, bd = blockDim.x;
    if (bd == NORM_BLOCK && width <= NORM_REGS * NORM_BLOCK) {
        float yv[NORM_REGS], v[NORM_REGS], wv[NORM_REGS];
#pragma unroll
        for (int u = 0; u < NORM_REGS; u++) {
            const int i = tid + u * NORM_BLOCK;
            yv[u] = i < width ? load_y(yr, i, y_mode) : 0.f;
            v[u] = i < width ? xr[i] : 0.f;
            wv[u] = i < width ? w[i] : 0.f;
        }
        float s = 0.f;
#pragma unroll
        for (int u = 0; u < NORM_REGS; u++) {
            const int i = tid + u * NORM_BLOCK;
            if (i < width) {
                v[u] += yv[u];
                xr[i] = v[u];
                s += v[u] * v[u];
            }
        }
        const float inv = rsqrtf(block_sum(s, part) / (float)width + eps);
#pragma unroll
        for (int u = 0; u < NORM_REGS; u++) {
            const int i = tid + u * NORM_BLOCK;
            if (i < width) o[i] = wv[u] * (v[u] * inv);
        }
    } else {
        float s = 0.f;
        for (int i0 = tid; i0 < width; i0 += 8 * bd) {
            float yv[8], xv[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + u * bd;
                yv[u] = i < width ? load_y(yr, i, y_mode) : 0.f;
                xv[u] = i < width ? xr[i] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + u * bd;
                if (i < width) {
                    const float v = xv[u] + yv[u];
                    xr[i] = v;
                    s += v * v;
                }
            }
        }
        const float inv = rsqrtf(block_sum(s, part) / (float)width + eps);
        for (int i0 = tid; i0 < width; i0 += 8 * bd) {
            float xv[8], wv[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + u * bd;
                xv[u] = i < width ? xr[i] : 0.f;
                wv[u] = i < width ? w[i] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = i0 + u * bd;
                if (i < width) o[i] = wv[u] * (xv[u] * inv);
            }
        }
    }
    __syncthreads();
}

// Spins until the mapped word *flag equals value (thread 0 of each block polls,
// the block then proceeds): how a kernel waits for the host without a stream
// memory operation. Traps after ~60 s so a host that died cannot hang the GPU.
__device__ __forceinline__ void wait_flag(const volatile unsigned* flag, unsigned value) {
    if (threadIdx.x == 0) {
        unsigned long long t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        while (*flag != value) {
            __nanosleep(64);
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
            if (t - t0 > 60000000000ull) __trap();
        }
        __threadfence_system();
    }
    __syncthreads();
}

// x[r] += y[r]; out[r] = RMSNorm(x[r]) · w, per row (add_inplace then rmsnorm in
// one launch, same arithmetic). y_mapped: y is mapped host memory the CPU
// rewrites between steps (read uncached). With a flag, the kernel first waits
// for *flag == value (the host's "done" of a hybrid handoff).  grid: rows, block: 256
extern "C" __global__ void add_rmsnorm(float* x, const float* y, int y_mapped, const float* w, float* out, int width,
                                       float eps, const unsigned* flag, unsigned value) {
    __shared__ float part[32];
    if (flag) wait_flag(flag, value);
    const size_t r = (size_t)blockIdx.x * width;
    add_rmsnorm_row(x + r, y + r, y_mapped ? 1 : 0, w, out + r, width, eps, part);
}

// Whether this block is the last of the grid to get here: every block's
// earlier global writes are visible to the last one. The last block resets
// `counter` for the next launch (kernels on one stream never overlap).
__device__ __forceinline__ bool last_block(unsigned* counter) {
    __shared__ bool is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
        if (is_last) *counter = 0u;
    }
    __syncthreads();
    if (is_last) __threadfence();
    return is_last;
}

// Asks L2 to fetch `bytes` from p (generic address), one 128-byte line per
// thread of the grid: no effect on results, only on where a later load finds them.
__device__ __forceinline__ void prefetch_l2(const void* p, long long bytes) {
    const long long stride = (long long)gridDim.x * blockDim.x * 128;
    for (long long off = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 128; off < bytes; off += stride)
        asm volatile("prefetch.L2 [%0];" ::"l"((const char*)p + off));
}

// y = x · woᵀ (gemv_bf16, one warp per row), then, by the grid's last block,
// res[t] += y[t]; out[t] = RMSNorm(res[t]) · nw for every token t (o_proj,
// residual add and the next norm in one launch). The grid first prefetches res
// and nw into L2, so the last block's serial tail finds them there rather
// than in DRAM.  grid: ⌈N/8⌉, block: 256
template <int TM>
__device__ __forceinline__ void gemv_add_rmsnorm_body(const float* x, const bf16_t* wo, float* y, int T, int N, int K,
                                                      float* res, const float* nw, float* out, float eps,
                                                      unsigned* counter) {
    __shared__ float part[32];
    prefetch_l2(res, (long long)T * N * 4);
    prefetch_l2(nw, (long long)N * 4);
    const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (n < N) gemv_row_store<TM>(x, wo, y, n, T, N, K);
    if (!last_block(counter)) return;
    for (int t = 0; t < T; t++)
        add_rmsnorm_row(res + (size_t)t * N, y + (size_t)t * N, 2, nw, out + (size_t)t * N, N, eps, part);
}
extern "C" __global__ void gemv_add_rmsnorm(const float* x, const bf16_t* wo, float* y, int T, int N, int K, float* res,
                                            const float* nw, float* out, float eps, unsigned* counter) {
    gemv_add_rmsnorm_body<GEMV_MAX_T>(x, wo, y, T, N, K, res, nw, out, eps, counter);
}
extern "C" __global__ void gemv_add_rmsnorm_t1(const float* x, const bf16_t* wo, float* y, int T, int N, int K,
                                               float* res, const float* nw, float* out, float eps, unsigned* counter) {
    gemv_add_rmsnorm_body<1>(x, wo, y, T, N, K, res, nw, out, eps, counter);
}

// Router logits (one warp per expert row) and, by the grid's last block, the
// softmax top-k of every token (one warp per token) into ids/weights. With
// `dst_h`, the kernel also copies the tokens' normed hidden states there and
// sets `*done = 0`, `*n_out = n_tokens`: the GPU half of a hybrid MoE handoff.
// With `doorbell`, the last block then rings it with `tag` itself (else a
// stream memory write after the kernel does). The copy's writes are issued
// before the GEMV, so they cross PCIe while it runs and the system fence after
// both rarely has to wait for them.
// grid: ⌈n_experts/W⌉, block: 32·W (W warps, a row each; the launcher picks W)
template <int TM>
__device__ __forceinline__ void router_fused_body(const float* a, const bf16_t* wr, float* logits, int n_tokens,
                                                  int n_experts, int k, int renormalize, int h, int* ids, float* weights,
                                                  float* dst_h, unsigned* done, unsigned* n_out, unsigned* counter,
                                                  unsigned* doorbell, unsigned tag) {
    if (dst_h) {
        const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        const long long stride = (long long)gridDim.x * blockDim.x;
        for (long long i = tid; i < (long long)n_tokens * h; i += stride) dst_h[i] = a[i];
    }
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n < n_experts) gemv_row_store<TM>(a, wr, logits, n, n_tokens, n_experts, h);
    if (dst_h) __threadfence_system();
    if (!last_block(counter)) return;
    for (int t = threadIdx.x >> 5; t < n_tokens; t += blockDim.x >> 5)
        warp_topk(logits + (size_t)t * n_experts, n_experts, k, renormalize, ids + t * k, weights + t * k);
    if (done) {
        __syncthreads();
        if (threadIdx.x == 0) {
            *(volatile unsigned*)done = 0u;
            *n_out = (unsigned)n_tokens;
            if (doorbell) {
                // Everything above (this grid's copies, ids, weights, flags)
                // reaches the host before the doorbell does.
                __threadfence_system();
                *(volatile unsigned*)doorbell = tag;
            }
        }
    }
}
extern "C" __global__ void router_fused(const float* a, const bf16_t* wr, float* logits, int n_tokens, int n_experts,
                                        int k, int renormalize, int h, int* ids, float* weights, float* dst_h,
                                        unsigned* done, unsigned* n_out, unsigned* counter, unsigned* doorbell,
                                        unsigned tag) {
    router_fused_body<GEMV_MAX_T>(a, wr, logits, n_tokens, n_experts, k, renormalize, h, ids, weights, dst_h, done,
                                  n_out, counter, doorbell, tag);
}
extern "C" __global__ void router_fused_t1(const float* a, const bf16_t* wr, float* logits, int n_tokens, int n_experts,
                                           int k, int renormalize, int h, int* ids, float* weights, float* dst_h,
                                           unsigned* done, unsigned* n_out, unsigned* counter, unsigned* doorbell,
                                           unsigned tag) {
    router_fused_body<1>(a, wr, logits, n_tokens, n_experts, k, renormalize, h, ids, weights, dst_h, done, n_out,
                         counter, doorbell, tag);
}
