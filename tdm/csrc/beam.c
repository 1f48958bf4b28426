/* Algorithm 1 (layer-wise beam search) for tdm's built-in scorers, one user at a time, in C.
 *
 * tdm/native.py compiles this file with the system's C compiler on first use and calls
 * tdm_beam_search through ctypes (which releases the GIL). It computes exactly what
 * tdm.retrieval.beam_search computes with ranking "node" on the CPU, without its per-operation
 * overhead: a user's search at 1M leaves is ~16 scored levels of ~40 nodes, where the torch path
 * spends more time dispatching ~40 small tensor operations per level than in their arithmetic.
 *
 * What depends on the user alone (tdm.model's user state: the activation unit's first layer
 * per behaviour, the first FC layer's share of the window averages) is computed once per user
 * into one float block (pack_user; for the product-DNN torch computes the user vector), from
 * the weights tdm/native.py lays out. FC widths are padded to multiples of 8 and the unit's
 * hidden size to a multiple of 4, with zeros, so that padding contributes nothing. Rounding
 * differs from torch's (other summation orders, fused multiply-adds), never the formula.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* Keep a loaded vector in a register for its several uses: left alone, GCC folds the load into
 * every multiply-add that reads it, and the kernels below become load-bound (-11% to -27% per
 * search with this, on AVX2/AVX-512 machines). */
#if defined(__AVX__)
#define KEEP(v) __asm__("" : "+v"(v))
#else
#define KEEP(v) ((void)0)
#endif

/* max(v, 0) lane by lane: one instruction with AVX, a compare and a mask elsewhere */
#if defined(__AVX__)
#define MAX0(v) ((v8)__builtin_ia32_maxps256((v), (v8){0}))
#else
#define MAX0(v) ((v8)((v8i)(v) & ((v) > (v8){0})))
#endif

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline float hsum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

typedef struct {
    int64_t n_nodes;
    int64_t depth;
    const int64_t *child_start; /* (n_nodes) first child; a node's children are contiguous */
    const int64_t *child_count; /* (n_nodes) */
    const int64_t *rows;        /* (n_nodes) embedding row of each node */
    const int64_t *node_item;   /* (n_nodes) item id at leaves */
    const uint8_t *is_leaf;     /* (n_nodes) */
} tdm_tree;

enum { KIND_DNN = 0, KIND_ATTENTION = 1, KIND_PRODUCT = 2 };

typedef struct {
    int64_t kind;
    int64_t dim;                /* D, the embedding size */
    int64_t table_stride;       /* floats between rows of the embedding table */
    const float *table;         /* (n_embeddings, table_stride) */
    const float *node_bias;     /* (n_embeddings) or NULL */
    int64_t n_layers;           /* FC layers after the first (DNN, attention-DNN) */
    const int64_t *width;       /* (n_layers + 1) padded widths; width[0]: the first layer's */
    const float *w_node;        /* (D, width[0]) the first layer's node columns, transposed */
    const float *slope0;        /* (width[0]) PReLU slopes after the first layer */
    const float *const *w;      /* layer i = 1..n_layers at [i - 1]: (width[i-1], width[i]) */
    const float *const *b;      /* (width[i]) */
    const float *const *slope;  /* (width[i]) */
    const float *w_out;         /* (width[n_layers]) the output layer */
    float b_out;
    int64_t hq;                 /* attention: the unit's hidden size padded to a multiple of 4 */
    const float *w_pos;         /* attention: (hq) the ReLU share of PReLU and output layer */
    /* what packs a user from its behaviours (DNN, attention-DNN; see pack_user) */
    int64_t windows;            /* W, the number of time windows (at most MAX_WINDOWS) */
    const float *b1;            /* (width[0]) the first layer's bias */
    const float *w1w;           /* (W, D, width[0]) the first layer's columns of each window */
    const float *a3t;           /* attention: (D, hq) A3 transposed: the pair part */
    const float *a24t;          /* (D, hq) (A2 - A4) transposed: the node part */
    const float *a14t;          /* (D, hq) (A1 + A4) transposed: the behaviour part */
    const float *a_bias;        /* (hq) the unit's first bias */
    const float *w_lin;         /* (hq) the linear share of PReLU and output layer */
    float unit_bias;            /* the unit's output bias */
} tdm_model;

#define MAX_WINDOWS 64

static inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

/* Floats per user block (L behaviours at most); split_user() splits a block. */
int64_t tdm_user_floats(const tdm_model *m, int64_t L) {
    int64_t D1 = m->dim + 1, W0 = m->kind == KIND_PRODUCT ? 0 : m->width[0];
    switch (m->kind) {
    case KIND_DNN:
        return W0;
    case KIND_PRODUCT:
        return round8(m->dim);
    default:
        return W0 + L * D1 * m->hq + L * D1 + L * W0;
    }
}

typedef struct {
    const float *base; /* (width[0]) the user's share of the first layer, bias included */
    const float *user; /* product-DNN: (D) the user vector */
    const float *unit; /* attention: (L, D + 1, hq) the unit's first layer per behaviour */
    const float *lin;  /* attention: (L, D + 1) its linear share, the unit's output bias in D */
    const float *sw;   /* attention: (L, width[0]) window spread times the first layer */
} user_parts;

static user_parts split_user(const tdm_model *m, const float *block, int64_t L) {
    user_parts p = {0};
    if (m->kind == KIND_PRODUCT) {
        p.user = block;
        return p;
    }
    int64_t D1 = m->dim + 1, W0 = m->width[0];
    p.base = block;
    if (m->kind == KIND_ATTENTION) {
        p.unit = block + W0;
        p.lin = p.unit + L * D1 * m->hq;
        p.sw = p.lin + L * D1;
    }
    return p;
}

/* A user's block (layouts at tdm_user_floats) from its behaviours, as tdm.model's user_state
 * computes it: a behaviour counts when its row and window are >= 0, and weighs 1 / (valid
 * behaviours of its window) in the window averages (windows above W - 1 count as W - 1). The
 * attention-DNN keeps the valid behaviours only (padding adds zero to every window average).
 * Returns the behaviours kept. */
static int64_t pack_user(const tdm_model *m, const int64_t *hist, const int64_t *windows,
                         int64_t L, float *block) {
    int64_t D = m->dim, W = m->windows, W0 = m->width[0], hq = m->hq, n = 0;
    int64_t count[MAX_WINDOWS] = {0};
    for (int64_t l = 0; l < L; ++l)
        if (hist[l] >= 0 && windows[l] >= 0) ++count[windows[l] < W ? windows[l] : W - 1];
    user_parts p = split_user(m, block, L);
    float *base = (float *)p.base, *unit = (float *)p.unit, *lin = (float *)p.lin;
    float *sw = (float *)p.sw;
    memcpy(base, m->b1, (size_t)W0 * sizeof(float));
    for (int64_t l = 0; l < L; ++l) {
        if (hist[l] < 0 || windows[l] < 0) continue;
        int64_t w = windows[l] < W ? windows[l] : W - 1;
        float inv = 1.0f / (float)count[w];
        const float *e = m->table + hist[l] * m->table_stride, *w1 = m->w1w + w * D * W0;
        if (m->kind == KIND_DNN) { /* the window average's share of the first layer */
            for (int64_t d = 0; d < D; ++d) {
                float x = inv * e[d];
                for (int64_t j = 0; j < W0; ++j) base[j] += x * w1[d * W0 + j];
            }
            continue;
        }
        float *u = unit + n * (D + 1) * hq, *row = u + D * hq, *out = sw + n * W0;
        for (int64_t d = 0; d < D; ++d)
            for (int64_t h = 0; h < hq; ++h)
                u[d * hq + h] = e[d] * m->a3t[d * hq + h] + m->a24t[d * hq + h];
        memcpy(row, m->a_bias, (size_t)hq * sizeof(float));
        for (int64_t d = 0; d < D; ++d)
            for (int64_t h = 0; h < hq; ++h) row[h] += e[d] * m->a14t[d * hq + h];
        for (int64_t d = 0; d <= D; ++d) {
            float x = d == D ? m->unit_bias : 0.0f;
            for (int64_t h = 0; h < hq; ++h) x += u[d * hq + h] * m->w_lin[h];
            lin[n * (D + 1) + d] = x;
        }
        memset(out, 0, (size_t)W0 * sizeof(float));
        for (int64_t d = 0; d < D; ++d) {
            float x = inv * e[d];
            for (int64_t j = 0; j < W0; ++j) out[j] += x * w1[d * W0 + j];
        }
        ++n;
    }
    return m->kind == KIND_DNN ? L : n;
}

/* y[r, :8 jv] (+)= x[r, :K] @ W[:K, :8 jv] for 4 rows at once (rows may repeat: a tail block
 * repeats its last row, whose result is not stored twice by the callers). */
static inline __attribute__((always_inline)) void tile4(
    const float *const x[4], int64_t K, const float *W, int64_t ldw, int jv, v8 acc[4][4]) {
    for (int64_t k = 0; k < K; ++k) {
        v8 w[4];
        for (int j = 0; j < jv; ++j) {
            w[j] = load8(W + k * ldw + 8 * j);
            KEEP(w[j]);
        }
        for (int r = 0; r < 4; ++r) {
            float a = x[r][k];
            for (int j = 0; j < jv; ++j) acc[r][j] += a * w[j];
        }
    }
}

static void rows4(const float *x, int64_t xs, int64_t n0, int64_t M, const float *out[4]) {
    for (int r = 0; r < 4; ++r) out[r] = x + (n0 + r < M ? n0 + r : M - 1) * xs;
}

/* y[:M, :N] += x[:M, :K] @ W[:K, :N]; N a multiple of 8; rows of x, W and y are xs, ldw and ys
 * apart. */
static void gemm_acc(const float *x, int64_t M, int64_t K, int64_t xs, const float *W,
                     int64_t ldw, int64_t N, float *y, int64_t ys) {
    for (int64_t n0 = 0; n0 < M; n0 += 4) {
        const float *xr[4];
        rows4(x, xs, n0, M, xr);
        int nb = M - n0 < 4 ? (int)(M - n0) : 4;
        for (int64_t j0 = 0; j0 < N; j0 += 32) {
            int jv = N - j0 >= 32 ? 4 : (int)((N - j0) / 8);
            v8 acc[4][4] = {{{0}}};
            switch (jv) {
            case 4: tile4(xr, K, W + j0, ldw, 4, acc); break;
            case 3: tile4(xr, K, W + j0, ldw, 3, acc); break;
            case 2: tile4(xr, K, W + j0, ldw, 2, acc); break;
            default: tile4(xr, K, W + j0, ldw, 1, acc); break;
            }
            for (int r = 0; r < nb; ++r)
                for (int j = 0; j < jv; ++j) {
                    float *p = y + (n0 + r) * ys + j0 + 8 * j;
                    store8(p, load8(p) + acc[r][j]);
                }
        }
    }
}

static void prelu(float *h, int64_t M, int64_t N, const float *slope) {
    for (int64_t n = 0; n < M; ++n) {
        float *row = h + n * N;
        for (int64_t j = 0; j < N; ++j) row[j] = row[j] >= 0.0f ? row[j] : row[j] * slope[j];
    }
}

/* weight[l, n] += sum_h relu(x[l, n, h]) w_pos[h] with x[l, n] = [e_n, 1] @ unit[l] (D + 1, hq),
 * vectorised over nodes: ET holds the node embeddings transposed, (D, Mp) with Mp = 8 nv. */
static inline __attribute__((always_inline)) void unit_tile(
    const float *ET, int64_t Mp, int64_t D, const float *u, int64_t hq, const float *w_pos,
    int nv, v8 s[5]) {
    const v8 zero = {0};
    for (int64_t h0 = 0; h0 < hq; h0 += 4) {
        v8 acc[5][4];
        for (int j = 0; j < 4; ++j) {
            float bias = u[D * hq + h0 + j]; /* row D: the user's part */
            for (int i = 0; i < nv; ++i) acc[i][j] = zero + bias;
        }
        for (int64_t d = 0; d < D; ++d) {
            v8 e[5];
            for (int i = 0; i < nv; ++i) {
                e[i] = load8(ET + d * Mp + 8 * i);
                KEEP(e[i]);
            }
            const float *ud = u + d * hq + h0;
            for (int j = 0; j < 4; ++j) {
                float c = ud[j];
                for (int i = 0; i < nv; ++i) acc[i][j] += e[i] * c;
            }
        }
        for (int j = 0; j < 4; ++j) {
            float w = w_pos[h0 + j];
            for (int i = 0; i < nv; ++i) s[i] += MAX0(acc[i][j]) * w;
        }
    }
}

static void activation_unit(const tdm_model *m, const float *ET, int64_t Mp, const float *unit,
                            int64_t L, float *weightT) {
    int64_t D = m->dim, hq = m->hq;
    for (int64_t v0 = 0; v0 < Mp / 8; v0 += 5) {
        int nv = Mp / 8 - v0 < 5 ? (int)(Mp / 8 - v0) : 5;
        const float *et = ET + 8 * v0;
        for (int64_t l = 0; l < L; ++l) {
            const float *u = unit + l * (D + 1) * hq;
            v8 s[5] = {{0}};
            switch (nv) {
            case 5: unit_tile(et, Mp, D, u, hq, m->w_pos, 5, s); break;
            case 4: unit_tile(et, Mp, D, u, hq, m->w_pos, 4, s); break;
            case 3: unit_tile(et, Mp, D, u, hq, m->w_pos, 3, s); break;
            case 2: unit_tile(et, Mp, D, u, hq, m->w_pos, 2, s); break;
            default: unit_tile(et, Mp, D, u, hq, m->w_pos, 1, s); break;
            }
            for (int i = 0; i < nv; ++i) {
                float *p = weightT + l * Mp + 8 * (v0 + i);
                store8(p, load8(p) + s[i]);
            }
        }
    }
}

/* Logits of M nodes (embedding rows ``rows``) for one user; ``work`` holds scratch space
 * (see work_floats). */
static void score_nodes(const tdm_model *m, const user_parts *u, int64_t L, const int64_t *rows,
                        int64_t M, float *out, float *work) {
    int64_t D = m->dim;
    float *E = work; /* (M, D) node embeddings */
    for (int64_t n = 0; n < M; ++n)
        memcpy(E + n * D, m->table + rows[n] * m->table_stride, (size_t)D * sizeof(float));
    if (m->kind == KIND_PRODUCT) {
        for (int64_t n = 0; n < M; ++n) {
            float s = 0.0f;
            for (int64_t d = 0; d < D; ++d) s += E[n * D + d] * u->user[d];
            out[n] = s;
        }
    } else {
        int64_t W0 = m->width[0], wmax = W0;
        for (int64_t i = 1; i <= m->n_layers; ++i) wmax = m->width[i] > wmax ? m->width[i] : wmax;
        float *h = E + M * D, *g = h + M * wmax; /* (M, wmax) each */
        for (int64_t n = 0; n < M; ++n) memcpy(h + n * W0, u->base, (size_t)W0 * sizeof(float));
        gemm_acc(E, M, D, D, m->w_node, W0, W0, h, W0);
        if (m->kind == KIND_ATTENTION) {
            int64_t Mp = round8(M), Lp = round8(L);
            float *ET = g, *weightT = ET + D * Mp, *weight = weightT + L * Mp;
            for (int64_t d = 0; d < D; ++d) /* (D, Mp) node embeddings transposed */
                for (int64_t n = 0; n < Mp; ++n) ET[d * Mp + n] = n < M ? E[n * D + d] : 0.0f;
            for (int64_t l = 0; l < L; ++l) /* the linear share: bias, then [e_n] @ lin[l] */
                for (int64_t n = 0; n < Mp; ++n) weightT[l * Mp + n] = u->lin[l * (D + 1) + D];
            gemm_acc(u->lin, L, D, D + 1, ET, Mp, Mp, weightT, Mp);
            activation_unit(m, ET, Mp, u->unit, L, weightT);
            for (int64_t n = 0; n < M; ++n) /* (M, Lp) activation weights */
                for (int64_t l = 0; l < Lp; ++l) weight[n * Lp + l] = l < L ? weightT[l * Mp + n] : 0.0f;
            gemm_acc(weight, M, L, Lp, u->sw, W0, W0, h, W0); /* the weighted window averages */
        }
        prelu(h, M, W0, m->slope0);
        int64_t width = W0;
        for (int64_t i = 1; i <= m->n_layers; ++i) {
            int64_t next = m->width[i];
            for (int64_t n = 0; n < M; ++n)
                memcpy(g + n * next, m->b[i - 1], (size_t)next * sizeof(float));
            gemm_acc(h, M, width, width, m->w[i - 1], next, next, g, next);
            prelu(g, M, next, m->slope[i - 1]);
            float *t = h;
            h = g;
            g = t;
            width = next;
        }
        for (int64_t n = 0; n < M; ++n) {
            v8 s = {0};
            for (int64_t j = 0; j < width; j += 8) s += load8(h + n * width + j) * load8(m->w_out + j);
            out[n] = hsum8(s) + m->b_out;
        }
    }
    if (m->node_bias)
        for (int64_t n = 0; n < M; ++n) out[n] += m->node_bias[rows[n]];
}

static int64_t work_floats(const tdm_model *m, int64_t M, int64_t L) {
    int64_t wmax = 0, Mp = round8(M), Lp = round8(L);
    if (m->kind != KIND_PRODUCT)
        for (int64_t i = 0; i <= m->n_layers; ++i) wmax = m->width[i] > wmax ? m->width[i] : wmax;
    int64_t attention = m->kind == KIND_ATTENTION ? Mp * (m->dim + Lp) + Lp * Mp : 0;
    return M * (m->dim + wmax) + (M * wmax > attention ? M * wmax : attention) + 64;
}

typedef struct {
    float score;
    int32_t order; /* ties: the earlier pair first */
    int64_t node;
} scored_node;

static int cmp_scored(const void *a, const void *b) {
    const scored_node *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->order > y->order) - (x->order < y->order);
}

/* The best min(k, count) pairs moved to the front, best first. */
static void top_k(scored_node *s, int64_t count, int64_t k) {
    if (k * count > 4096) {
        qsort(s, (size_t)count, sizeof *s, cmp_scored);
        return;
    }
    for (int64_t i = 0; i < k && i < count; ++i) { /* selection: a few dozen pairs */
        int64_t best = i;
        for (int64_t j = i + 1; j < count; ++j)
            if (cmp_scored(&s[j], &s[best]) < 0) best = j;
        scored_node t = s[i];
        s[i] = s[best];
        s[best] = t;
    }
}

static int excluded(const int64_t *ex, int64_t n_ex, int64_t node) {
    int64_t lo = 0, hi = n_ex;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (ex[mid] < node)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n_ex && ex[lo] == node;
}

/* Beam search (Algorithm 1, ranking "node") for n_users users.
 *
 * hist, windows: (n_users, L) behaviour rows and time windows, -1 on padding, from which each
 * user's block is packed (pack_user); for the product-DNN, whose user vector comes from torch,
 * users holds the blocks instead (tdm_user_floats(m, L) floats each) and hist is not read.
 * excluded / excluded_offsets: a CSR of sorted node ids never to enter the beam or the result
 * (the excluded leaves and the inner nodes all of whose leaves are excluded); k: beam width and
 * items returned (at most the number of items); max_arity: the tree's.
 * Output: out_items (n_users, k) item ids padded with -1, out_scores (n_users, k) logits padded
 * with -inf, best first, out_scored (n_users) nodes scored.
 * Returns the number of levels scored in all, or -1 when memory ran out.
 */
int64_t tdm_beam_search(const tdm_tree *t, const tdm_model *m, int64_t n_users,
                        const int64_t *hist, const int64_t *windows, int64_t L,
                        const float *users, const int64_t *excluded_nodes,
                        const int64_t *excluded_offsets, int64_t k, int64_t max_arity,
                        int64_t *out_items, float *out_scores, int64_t *out_scored) {
    int64_t cap = k * max_arity > max_arity ? k * max_arity : max_arity;
    int64_t levels = t->depth > 1 ? t->depth : 1;
    int64_t found_cap = levels * cap + 1;
    int64_t *buffer = malloc((size_t)(3 * cap) * sizeof(int64_t));
    float *logits = malloc((size_t)cap * sizeof(float));
    scored_node *cand = malloc((size_t)cap * sizeof(scored_node));
    scored_node *found = malloc((size_t)found_cap * sizeof(scored_node));
    float *work = malloc((size_t)work_floats(m, cap, L) * sizeof(float));
    int64_t stride = tdm_user_floats(m, L);
    float *block = users ? NULL : malloc((size_t)stride * sizeof(float));
    int64_t score_calls = 0;
    if (!buffer || !logits || !cand || !found || !work || (!users && !block)) {
        score_calls = -1;
        goto done;
    }
    int64_t *queue = buffer, *next = buffer + cap, *node_rows = buffer + 2 * cap;
    for (int64_t b = 0; b < n_users; ++b) {
        int64_t kept = L;
        if (!users) kept = pack_user(m, hist + b * L, windows + b * L, L, block);
        user_parts u = split_user(m, users ? users + b * stride : block, L);
        const int64_t *ex = excluded_nodes + excluded_offsets[b];
        int64_t n_ex = excluded_offsets[b + 1] - excluded_offsets[b];
        int64_t qn = 0, n_found = 0, scored = 0;
        if (t->depth == 0) {
            queue[qn++] = 0;
        } else {
            for (int64_t c = 0; c < t->child_count[0]; ++c) queue[qn++] = t->child_start[0] + c;
        }
        for (int64_t level = 1; level <= levels && qn > 0; ++level) {
            int any_leaf = 0;
            for (int64_t i = 0; i < qn; ++i) any_leaf |= t->is_leaf[queue[i]];
            if (qn > k || any_leaf) { /* line 4; else line 5 keeps every node of Q */
                for (int64_t i = 0; i < qn; ++i) node_rows[i] = t->rows[queue[i]];
                score_nodes(m, &u, kept, node_rows, qn, logits, work);
                scored += qn;
                ++score_calls;
            } else {
                memset(logits, 0, (size_t)qn * sizeof(float));
            }
            int64_t n_cand = 0;
            for (int64_t i = 0; i < qn; ++i) {
                int64_t node = queue[i];
                if (n_ex && excluded(ex, n_ex, node)) continue;
                scored_node s = {logits[i], (int32_t)(n_found + n_cand), node};
                if (t->is_leaf[node])
                    found[n_found++] = s; /* line 3: leaves go to A */
                else
                    cand[n_cand++] = s;
            }
            top_k(cand, n_cand, k); /* line 5 */
            int64_t keep = n_cand < k ? n_cand : k, nn = 0;
            for (int64_t i = 0; i < keep; ++i) { /* line 6: Q = children of the top k */
                int64_t node = cand[i].node;
                for (int64_t c = 0; c < t->child_count[node]; ++c)
                    next[nn++] = t->child_start[node] + c;
            }
            int64_t *swap = queue;
            queue = next;
            next = swap;
            qn = nn;
        }
        top_k(found, n_found, k); /* line 8 */
        for (int64_t i = 0; i < k; ++i) {
            int in = i < n_found;
            out_items[b * k + i] = in ? t->node_item[found[i].node] : -1;
            out_scores[b * k + i] = in ? found[i].score : -__builtin_inff();
        }
        out_scored[b] = scored;
    }
done:
    free(buffer);
    free(logits);
    free(cand);
    free(found);
    free(work);
    free(block);
    return score_calls;
}
