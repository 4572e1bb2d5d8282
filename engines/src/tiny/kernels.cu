// Kernels of tether's TinyEngine CUDA backend, compiled at run time by NVRTC.
//
// Every matrix is row-major f32; every size fits in an int (TinyConfig::validate).
// Each kernel computes exactly what the CPU backend computes (engines/src/tiny/cpu.rs);
// only the order of the floating-point sums differs.

#define NEG_INF __int_as_float(0xff800000)
#define TILE 16
#define NO_INDEX 0x7fffffff

// out[r, :] = table[tokens[r], :]
extern "C" __global__ void embed(float* out, const float* table, const unsigned int* tokens,
                                 int rows, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * d) return;
    int r = i / d, j = i - r * d;
    out[i] = table[(size_t)tokens[r] * d + j];
}

// out[rows, n] = x[rows, k] . w[k, n], in 16x16 shared-memory tiles.
extern "C" __global__ void matmul(float* out, const float* x, const float* w,
                                  int rows, int k, int n) {
    __shared__ float xs[TILE][TILE];
    __shared__ float ws[TILE][TILE];
    int r = blockIdx.y * TILE + threadIdx.y;
    int c = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (int t = 0; t < k; t += TILE) {
        int xk = t + threadIdx.x;
        int wk = t + threadIdx.y;
        xs[threadIdx.y][threadIdx.x] = (r < rows && xk < k) ? x[(size_t)r * k + xk] : 0.0f;
        ws[threadIdx.y][threadIdx.x] = (wk < k && c < n) ? w[(size_t)wk * n + c] : 0.0f;
        __syncthreads();
        for (int i = 0; i < TILE; ++i) acc += xs[threadIdx.y][i] * ws[i][threadIdx.x];
        __syncthreads();
    }
    if (r < rows && c < n) out[(size_t)r * n + c] = acc;
}

// One block (256 threads) per row: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight.
extern "C" __global__ void rmsnorm(float* out, const float* x, const float* weight,
                                   int rows, int d, float eps) {
    __shared__ float red[256];
    int r = blockIdx.x;
    const float* xr = x + (size_t)r * d;
    float s = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) s += xr[j] * xr[j];
    red[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    float inv = 1.0f / sqrtf(red[0] / (float)d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(size_t)r * d + j] = xr[j] * inv * weight[j];
}

// Rotate each (even, odd) pair of each head of each row by its position's angle.
extern "C" __global__ void rope(float* x, const unsigned int* positions, const float* cos_t,
                                const float* sin_t, int rows, int d, int head_dim) {
    int half = head_dim / 2;
    int pairs = d / 2;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * pairs) return;
    int r = i / pairs, p = i - r * pairs;
    int head = p / half, j = p - head * half;
    float* a = x + (size_t)r * d + head * head_dim + 2 * j;
    size_t at = (size_t)positions[r] * half + j;
    float c = cos_t[at], s = sin_t[at];
    float x0 = a[0], x1 = a[1];
    a[0] = x0 * c - x1 * s;
    a[1] = x0 * s + x1 * c;
}

// Copy rows row0.. of k and v into the cache at positions pos0.. .
extern "C" __global__ void kv_write(float* kv, const float* k, const float* v,
                                    unsigned long long k_off, unsigned long long v_off,
                                    int row0, int rows, int pos0, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * d) return;
    int r = i / d, j = i - r * d;
    size_t dst = (size_t)(pos0 + r) * d + j;
    size_t src = (size_t)(row0 + r) * d + j;
    kv[k_off + dst] = k[src];
    kv[v_off + dst] = v[src];
}

// One block per (head, row of the span): causal softmax(q.K^T * scale) . V over the
// cache positions 0..=pos0 + row. Dynamic shared memory: blockDim.x + pos0 + rows floats.
extern "C" __global__ void attention(float* out, const float* q, const float* kv,
                                     unsigned long long k_off, unsigned long long v_off,
                                     int row0, int pos0, int d, int head_dim, float scale) {
    extern __shared__ float sh[];
    int h = blockIdx.x, i = blockIdx.y;
    int tid = threadIdx.x, nt = blockDim.x;
    int row = row0 + i;
    int len = pos0 + i + 1;
    float* red = sh;
    float* scores = sh + nt;
    const float* qh = q + (size_t)row * d + h * head_dim;
    const float* keys = kv + k_off + h * head_dim;
    const float* vals = kv + v_off + h * head_dim;

    for (int t = tid; t < len; t += nt) {
        const float* kt = keys + (size_t)t * d;
        float s = 0.0f;
        for (int j = 0; j < head_dim; ++j) s += qh[j] * kt[j];
        scores[t] = s * scale;
    }
    __syncthreads();

    float m = NEG_INF;
    for (int t = tid; t < len; t += nt) m = fmaxf(m, scores[t]);
    red[tid] = m;
    __syncthreads();
    for (int o = nt / 2; o > 0; o >>= 1) {
        if (tid < o) red[tid] = fmaxf(red[tid], red[tid + o]);
        __syncthreads();
    }
    m = red[0];
    __syncthreads();

    float sum = 0.0f;
    for (int t = tid; t < len; t += nt) {
        float e = expf(scores[t] - m);
        scores[t] = e;
        sum += e;
    }
    red[tid] = sum;
    __syncthreads();
    for (int o = nt / 2; o > 0; o >>= 1) {
        if (tid < o) red[tid] += red[tid + o];
        __syncthreads();
    }
    float inv = 1.0f / red[0];

    for (int j = tid; j < head_dim; j += nt) {
        float acc = 0.0f;
        for (int t = 0; t < len; ++t) acc += scores[t] * vals[(size_t)t * d + j];
        out[(size_t)row * d + h * head_dim + j] = acc * inv;
    }
}

// x += y
extern "C" __global__ void add(float* x, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// gate = silu(gate) * up
extern "C" __global__ void silu_mul(float* gate, const float* up, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// out[i, :] = x[rows[i], :]
extern "C" __global__ void gather_rows(float* out, const float* x, const unsigned int* rows,
                                       int count, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count * d) return;
    int r = i / d, j = i - r * d;
    out[i] = x[(size_t)rows[r] * d + j];
}

// One block (256 threads) per row: the index of the largest logit, lowest index on a tie.
extern "C" __global__ void argmax(unsigned int* out, const float* logits, int rows, int vocab) {
    __shared__ float best_v[256];
    __shared__ int best_i[256];
    int r = blockIdx.x, tid = threadIdx.x;
    const float* l = logits + (size_t)r * vocab;
    float bv = NEG_INF;
    int bi = NO_INDEX;
    // Increasing j: a thread keeps the first of its equal maxima.
    for (int j = tid; j < vocab; j += blockDim.x) {
        float v = l[j];
        if (bi == NO_INDEX || v > bv) { bv = v; bi = j; }
    }
    best_v[tid] = bv;
    best_i[tid] = bi;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (tid < o) {
            float v2 = best_v[tid + o];
            int i2 = best_i[tid + o];
            int i1 = best_i[tid];
            if (i2 != NO_INDEX &&
                (i1 == NO_INDEX || v2 > best_v[tid] || (v2 == best_v[tid] && i2 < i1))) {
                best_v[tid] = v2;
                best_i[tid] = i2;
            }
        }
        __syncthreads();
    }
    if (tid == 0) out[r] = (unsigned int)best_i[0];
}
