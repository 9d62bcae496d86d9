//! GPU kernel tests against CPU references on random inputs. Without a CUDA
//! driver they print why they skip and pass (CI has no GPU); the device script
//! (`scripts/device-gpu-check.sh`) runs them on the GPU machine.

use half::bf16;
use lvllm_kernels_cuda::{Error, Gpu, RouterHandoff};

fn gpu() -> Option<Gpu> {
    match Gpu::new(0, Some(&std::env::temp_dir().join("lvllm-test-kernels"))) {
        Ok(g) => Some(g),
        Err(e @ (Error::NoDriver | Error::NoNvrtc | Error::NoCublas | Error::NoDevice { .. })) => {
            println!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("CUDA is present but failed: {e}"),
    }
}

fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
    let err = got.iter().zip(want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
    println!("{name}: max |err| {err:.2e} (scale {scale:.2e})");
    assert!(err <= tol * scale, "{name}: max |err| {err} > {tol} × {scale}");
}

fn bf(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

#[test]
#[allow(clippy::needless_range_loop)]
fn kernels_match_cpu_references() {
    let Some(g) = gpu() else { return };
    println!("device: {} sm_{}{}", g.name(), g.compute_capability().0, g.compute_capability().1);
    // SAFETY: all launches below use buffers allocated here with the sizes
    // the launcher's contract names.
    unsafe {
        // rmsnorm
        let (r, w) = (5, 200);
        let x = rnd(r * w, 1);
        let wt = rnd(w, 2);
        let (dx, dw, dout) = (g.upload(&x).unwrap(), g.upload(&wt).unwrap(), g.alloc::<f32>(r * w).unwrap());
        g.rmsnorm(g.ptr(&dx), g.ptr(&dw), g.ptr(&dout), r, w, 1e-6).unwrap();
        let mut want = x.clone();
        for row in want.chunks_mut(w) {
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / w as f32 + 1e-6).sqrt();
            for (v, ww) in row.iter_mut().zip(&wt) {
                *v = ww * (*v * inv);
            }
        }
        close("rmsnorm", &g.download(&dout).unwrap(), &want, 1e-5);

        // gemm_bf16: y[t,n] = x[t,k] w[n,k]^T on bf16-rounded inputs
        let (t, n, k) = (7, 96, 136);
        let (xs, ws) = (bf(&rnd(t * k, 3)), bf(&rnd(n * k, 4)));
        let (dxb, dwb, dy) = (g.upload(&xs).unwrap(), g.upload(&ws).unwrap(), g.alloc::<f32>(t * n).unwrap());
        g.gemm_bf16(g.ptr(&dxb), g.ptr(&dwb), g.ptr(&dy), t, n, k).unwrap();
        let f = |v: u16| bf16::from_bits(v).to_f32();
        let want: Vec<f32> =
            (0..t * n).map(|i| (0..k).map(|p| f(xs[(i / n) * k + p]) * f(ws[(i % n) * k + p])).sum()).collect();
        close("gemm_bf16", &g.download(&dy).unwrap(), &want, 1e-5);

        // to_bf16, add, silu_mul
        let a = rnd(1000, 5);
        let b = rnd(1000, 6);
        let (da, db) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
        let dbf = g.alloc::<u16>(1000).unwrap();
        g.to_bf16(g.ptr(&da), g.ptr(&dbf), 1000).unwrap();
        assert_eq!(g.download(&dbf).unwrap(), bf(&a), "to_bf16 rounds to nearest even");
        let dsm = g.alloc::<f32>(1000).unwrap();
        g.silu_mul(g.ptr(&da), g.ptr(&db), g.ptr(&dsm), 1000).unwrap();
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x / (1.0 + (-x).exp()) * y).collect();
        close("silu_mul", &g.download(&dsm).unwrap(), &want, 1e-5);
        g.add_inplace(g.ptr(&da), g.ptr(&db), 1000).unwrap();
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        close("add_inplace", &g.download(&da).unwrap(), &want, 1e-6);

        // rope
        let (tok, heads, dim) = (3, 4, 16);
        let x = rnd(tok * heads * dim, 7);
        let pos = [0i32, 5, 77];
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / dim as f32)).collect();
        let (dx, dp, di) = (g.upload(&x).unwrap(), g.upload(&pos).unwrap(), g.upload(&inv).unwrap());
        g.rope_neox(g.ptr(&dx), g.ptr(&dp), g.ptr(&di), 1.1, tok, heads, dim).unwrap();
        let mut want = x.clone();
        for ti in 0..tok {
            for h in 0..heads {
                let base = (ti * heads + h) * dim;
                for j in 0..dim / 2 {
                    let ang = pos[ti] as f32 * inv[j];
                    let (c, s) = (ang.cos() * 1.1, ang.sin() * 1.1);
                    let (x1, x2) = (x[base + j], x[base + j + dim / 2]);
                    want[base + j] = x1 * c - x2 * s;
                    want[base + j + dim / 2] = x2 * c + x1 * s;
                }
            }
        }
        close("rope_neox", &g.download(&dx).unwrap(), &want, 1e-5);

        // router top-k (one warp per token): small and real router widths, k up
        // to 32, and ties (the lower expert index first)
        for (case, &(tk, e, kk)) in [(6, 16, 4), (3, 128, 8), (2, 160, 8), (2, 512, 32)].iter().enumerate() {
            let mut lg = rnd(tk * e, 8 + case as u64);
            lg[3] = lg[1];
            lg[e + 7] = lg[e + 2];
            let dl = g.upload(&lg).unwrap();
            let (dids, dw) = (g.alloc::<i32>(tk * kk).unwrap(), g.alloc::<f32>(tk * kk).unwrap());
            g.router_topk(g.ptr(&dl), tk, e, kk, true, g.ptr(&dids), g.ptr(&dw)).unwrap();
            let ids = g.download(&dids).unwrap();
            let ws = g.download(&dw).unwrap();
            for ti in 0..tk {
                let row = &lg[ti * e..(ti + 1) * e];
                let mut order: Vec<usize> = (0..e).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let mx = row.iter().fold(f32::MIN, |a, &b| a.max(b));
                let sum: f32 = order[..kk].iter().map(|&i| (row[i] - mx).exp()).sum();
                for j in 0..kk {
                    assert_eq!(ids[ti * kk + j] as usize, order[j], "router ids, {e} experts, token {ti}, rank {j}");
                    let want = (row[order[j]] - mx).exp() / sum;
                    assert!((ws[ti * kk + j] - want).abs() < 1e-6, "router weights");
                }
            }
        }
        assert!(g.router_topk(0, 1, 513, 8, true, 0, 0).is_err(), "more experts than the kernel takes");
        assert!(g.router_topk(0, 1, 128, 33, true, 0, 0).is_err(), "k over 32");

        // paged attention over a scrambled block table, two sequences, GQA 4:2
        let (nh, nkv, d, bs) = (4, 2, 32, 4);
        let lens = [6usize, 9];
        let max_blocks = 3;
        let tables: Vec<i32> = vec![5, 1, 3, 0, 2, 4];
        let slots_total = 6 * bs;
        let kc = rnd(slots_total * nkv * d, 9);
        let vc = rnd(slots_total * nkv * d, 10);
        // Queries: every position of both sequences.
        let toks: Vec<(usize, usize)> = (0..2).flat_map(|s| (0..lens[s]).map(move |p| (s, p))).collect();
        let q = rnd(toks.len() * nh * d, 11);
        let posv: Vec<i32> = toks.iter().map(|&(_, p)| p as i32).collect();
        let seqv: Vec<i32> = toks.iter().map(|&(s, _)| s as i32).collect();
        let (dq, dk, dv) = (g.upload(&q).unwrap(), g.upload(&kc).unwrap(), g.upload(&vc).unwrap());
        let (dpos, dseq, dbt) = (g.upload(&posv).unwrap(), g.upload(&seqv).unwrap(), g.upload(&tables).unwrap());
        let dout = g.alloc::<f32>(q.len()).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        g.paged_attention(
            g.ptr(&dq),
            g.ptr(&dk),
            g.ptr(&dv),
            g.ptr(&dout),
            g.ptr(&dpos),
            g.ptr(&dseq),
            g.ptr(&dbt),
            max_blocks,
            bs,
            toks.len(),
            nh,
            nkv,
            d,
            scale,
        )
        .unwrap();
        let mut want = vec![0f32; q.len()];
        for (ti, &(s, p)) in toks.iter().enumerate() {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qh = &q[(ti * nh + h) * d..(ti * nh + h + 1) * d];
                let slot = |j: usize| tables[s * max_blocks + j / bs] as usize * bs + j % bs;
                let sc: Vec<f32> = (0..=p)
                    .map(|j| (0..d).map(|i| qh[i] * kc[(slot(j) * nkv + kvh) * d + i]).sum::<f32>() * scale)
                    .collect();
                let mx = sc.iter().fold(f32::MIN, |a, &b| a.max(b));
                let z: f32 = sc.iter().map(|v| (v - mx).exp()).sum();
                for i in 0..d {
                    want[(ti * nh + h) * d + i] =
                        (0..=p).map(|j| (sc[j] - mx).exp() / z * vc[(slot(j) * nkv + kvh) * d + i]).sum();
                }
            }
        }
        close("paged_attention", &g.download(&dout).unwrap(), &want, 1e-5);

        // gemv (f32 activations × bf16 weights) for 1..16 rows, K with and without a multiple of 8
        for (t, n, k) in [(1usize, 70usize, 256usize), (5, 33, 136), (16, 8, 100)] {
            let x = rnd(t * k, 20 + t as u64);
            let wb = bf(&rnd(n * k, 21));
            let (dx, dw, dy) = (g.upload(&x).unwrap(), g.upload(&wb).unwrap(), g.alloc::<f32>(t * n).unwrap());
            g.gemv_bf16(g.ptr(&dx), g.ptr(&dw), g.ptr(&dy), t, n, k).unwrap();
            let f = |v: u16| bf16::from_bits(v).to_f32();
            let want: Vec<f32> =
                (0..t * n).map(|i| (0..k).map(|p| x[(i / n) * k + p] * f(wb[(i % n) * k + p])).sum()).collect();
            close(&format!("gemv_bf16 t={t} k={k}"), &g.download(&dy).unwrap(), &want, 1e-5);
        }
        assert!(g.gemv_bf16(0, 0, 0, 17, 1, 8).is_err(), "more than 16 rows is refused");

        // moe_gemv (per-token and per-slot inputs) and moe_combine_add
        let (tn, topk, ne, n, k) = (3usize, 2usize, 5usize, 24usize, 64usize);
        let x = rnd(tn * k, 30);
        let w_all = bf(&rnd(ne * n * k, 31));
        let ids: Vec<i32> = vec![4, 1, 0, 4, 2, 3];
        let (dx, dw, di) = (g.upload(&x).unwrap(), g.upload(&w_all).unwrap(), g.upload(&ids).unwrap());
        let dy = g.alloc::<f32>(tn * topk * n).unwrap();
        g.moe_gemv_bf16(g.ptr(&dx), g.ptr(&dw), g.ptr(&di), g.ptr(&dy), tn * topk, n, k, topk, false).unwrap();
        let f = |v: u16| bf16::from_bits(v).to_f32();
        let want: Vec<f32> = (0..tn * topk * n)
            .map(|i| {
                let (s, r) = (i / n, i % n);
                let e = ids[s] as usize;
                (0..k).map(|p| x[(s / topk) * k + p] * f(w_all[(e * n + r) * k + p])).sum()
            })
            .collect();
        let y = g.download(&dy).unwrap();
        close("moe_gemv_bf16 per token", &y, &want, 1e-5);
        let xs = rnd(tn * topk * k, 32);
        let dxs = g.upload(&xs).unwrap();
        g.moe_gemv_bf16(g.ptr(&dxs), g.ptr(&dw), g.ptr(&di), g.ptr(&dy), tn * topk, n, k, topk, true).unwrap();
        let want: Vec<f32> = (0..tn * topk * n)
            .map(|i| {
                let (s, r) = (i / n, i % n);
                let e = ids[s] as usize;
                (0..k).map(|p| xs[s * k + p] * f(w_all[(e * n + r) * k + p])).sum()
            })
            .collect();
        let ys = g.download(&dy).unwrap();
        close("moe_gemv_bf16 per slot", &ys, &want, 1e-5);
        let wts = [0.25f32, 0.75, 1.0, -0.5, 0.1, 0.9];
        let base = rnd(tn * n, 33);
        let (dwt, dout) = (g.upload(&wts).unwrap(), g.upload(&base).unwrap());
        g.moe_combine_add(g.ptr(&dy), g.ptr(&dwt), g.ptr(&dout), tn, topk, n).unwrap();
        let want: Vec<f32> = (0..tn * n)
            .map(|i| {
                base[i] + (0..topk).map(|j| wts[(i / n) * topk + j] * ys[((i / n) * topk + j) * n + i % n]).sum::<f32>()
            })
            .collect();
        close("moe_combine_add", &g.download(&dout).unwrap(), &want, 1e-6);
        // a decode-sized row over several blocks (width not a multiple of 256) and
        // k = 10 (a full and a partial batch of loads)
        let (tn, topk, n) = (2usize, 10usize, 2088usize);
        let (yw, wts, base) = (rnd(tn * topk * n, 34), rnd(tn * topk, 35), rnd(tn * n, 36));
        let (dyw, dwt, dout) = (g.upload(&yw).unwrap(), g.upload(&wts).unwrap(), g.upload(&base).unwrap());
        g.moe_combine_add(g.ptr(&dyw), g.ptr(&dwt), g.ptr(&dout), tn, topk, n).unwrap();
        let want: Vec<f32> = (0..tn * n)
            .map(|i| {
                let (t, c) = (i / n, i % n);
                base[i] + (0..topk).map(|j| wts[t * topk + j] * yw[(t * topk + j) * n + c]).sum::<f32>()
            })
            .collect();
        close("moe_combine_add wide", &g.download(&dout).unwrap(), &want, 1e-6);

        // split_bf16 + sum_halves: hi + lo reproduces x to ~16 mantissa bits
        let x = rnd(500, 40);
        let dx = g.upload(&x).unwrap();
        let ds = g.alloc::<u16>(1000).unwrap();
        g.split_bf16(g.ptr(&dx), g.ptr(&ds), 500).unwrap();
        let s2 = g.download(&ds).unwrap();
        for (i, &v) in x.iter().enumerate() {
            let back = bf16::from_bits(s2[i]).to_f32() + bf16::from_bits(s2[500 + i]).to_f32();
            assert!((back - v).abs() <= v.abs() * 2f32.powi(-15), "split of {v}: {back}");
        }
        let y2 = rnd(1000, 41);
        let (dy2, dsum) = (g.upload(&y2).unwrap(), g.alloc::<f32>(500).unwrap());
        g.sum_halves(g.ptr(&dy2), g.ptr(&dsum), 500).unwrap();
        let want: Vec<f32> = (0..500).map(|i| y2[i] + y2[500 + i]).collect();
        close("sum_halves", &g.download(&dsum).unwrap(), &want, 0.0);

        // gather / scatter-add / kv_write / embedding
        let w = 40;
        let x = rnd(5 * w, 12);
        let idx = [3i32, 0, 4];
        let (dx, didx) = (g.upload(&x).unwrap(), g.upload(&idx).unwrap());
        let dg = g.alloc::<f32>(3 * w).unwrap();
        g.gather_rows(g.ptr(&dx), g.ptr(&didx), g.ptr(&dg), 3, w).unwrap();
        let want: Vec<f32> = idx.iter().flat_map(|&i| x[i as usize * w..(i as usize + 1) * w].to_vec()).collect();
        close("gather_rows", &g.download(&dg).unwrap(), &want, 0.0);
        let wts = [0.5f32, 2.0, -1.0];
        let dwts = g.upload(&wts).unwrap();
        g.scatter_add_weighted(g.ptr(&dg), g.ptr(&didx), g.ptr(&dwts), g.ptr(&dx), 3, w).unwrap();
        let mut want = x.clone();
        for (r, &i) in idx.iter().enumerate() {
            for c in 0..w {
                want[i as usize * w + c] += wts[r] * x[i as usize * w + c];
            }
        }
        close("scatter_add_weighted", &g.download(&dx).unwrap(), &want, 1e-6);
        let table = bf(&rnd(10 * w, 13));
        let ids = [9u32, 0, 9, 4];
        let (dt, di) = (g.upload(&table).unwrap(), g.upload(&ids).unwrap());
        let de = g.alloc::<f32>(4 * w).unwrap();
        g.embedding(g.ptr(&di), g.ptr(&dt), g.ptr(&de), 4, w).unwrap();
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| table[i as usize * w..(i as usize + 1) * w].iter().map(|&b| bf16::from_bits(b).to_f32()))
            .collect();
        close("embedding", &g.download(&de).unwrap(), &want, 0.0);
    }
}

/// The fused decode kernels against the separate kernels they replace (each of
/// which is checked against a CPU reference above).
#[test]
fn fused_kernels_match_their_parts() {
    let Some(g) = gpu() else { return };
    // SAFETY: all launches below use buffers allocated here with the sizes the
    // launchers' contracts name.
    unsafe {
        // gemv3 = three gemv_bf16 (same per-row arithmetic: bit-identical)
        let (t, k) = (3, 264);
        let rows = [40usize, 8, 8];
        let x = g.upload(&rnd(t * k, 50)).unwrap();
        let ws: Vec<_> =
            rows.iter().enumerate().map(|(i, &r)| g.upload(&bf(&rnd(r * k, 51 + i as u64))).unwrap()).collect();
        let ys: Vec<_> = rows.iter().map(|&r| g.alloc::<f32>(t * r).unwrap()).collect();
        let mats = [0, 1, 2].map(|i| (g.ptr(&ws[i]), g.ptr(&ys[i]), rows[i]));
        g.gemv3_bf16(g.ptr(&x), t, k, mats).unwrap();
        for i in 0..3 {
            let want = g.alloc::<f32>(t * rows[i]).unwrap();
            g.gemv_bf16(g.ptr(&x), g.ptr(&ws[i]), g.ptr(&want), t, rows[i], k).unwrap();
            close(&format!("gemv3_bf16 matrix {i}"), &g.download(&ys[i]).unwrap(), &g.download(&want).unwrap(), 0.0);
        }

        // The one-row kernels (`_t1`, eight loads ahead) give the bits of the
        // general kernel: one token alone vs. the same token twice in a batch.
        for k in [2048, 4096, 768, 264] {
            let n = 64;
            let x1 = rnd(k, 55);
            let x2: Vec<f32> = x1.iter().chain(&x1).copied().collect();
            let w = g.upload(&bf(&rnd(n * k, 56))).unwrap();
            let (dx1, dx2) = (g.upload(&x1).unwrap(), g.upload(&x2).unwrap());
            let (y1, y2) = (g.alloc::<f32>(n).unwrap(), g.alloc::<f32>(2 * n).unwrap());
            g.gemv_bf16(g.ptr(&dx1), g.ptr(&w), g.ptr(&y1), 1, n, k).unwrap();
            g.gemv_bf16(g.ptr(&dx2), g.ptr(&w), g.ptr(&y2), 2, n, k).unwrap();
            let (a, b) = (g.download(&y1).unwrap(), g.download(&y2).unwrap());
            assert_eq!(a[..], b[..n], "gemv_bf16_t1 vs gemv_bf16, k {k}");
            assert_eq!(b[..n], b[n..], "gemv_bf16 rows, k {k}");
        }

        // qk_norm_rope_kv = rmsnorm(q), rmsnorm(k), rope_neox(q), rope_neox(k), kv_write
        let (tok, nh, nkv, dim) = (2, 4, 2, 128);
        let (q, kk, v) = (rnd(tok * nh * dim, 60), rnd(tok * nkv * dim, 61), rnd(tok * nkv * dim, 62));
        let (qw, kw) = (rnd(dim, 63), rnd(dim, 64));
        let pos = [3i32, 41];
        let slots = [5i32, 2];
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / 1e6f32.powf(2.0 * i as f32 / dim as f32)).collect();
        let up = |v: &[f32]| g.upload(v).unwrap();
        let (dqw, dkw, dinv, dpos, dslots) =
            (up(&qw), up(&kw), up(&inv), g.upload(&pos).unwrap(), g.upload(&slots).unwrap());
        let cache = 8 * nkv * dim;
        // fused
        let (fq, fk, fv) = (up(&q), up(&kk), up(&v));
        let (fkc, fvc) = (up(&vec![0.0; cache]), up(&vec![0.0; cache]));
        g.qk_norm_rope_kv(
            (g.ptr(&fq), g.ptr(&fk), g.ptr(&fv)),
            (g.ptr(&dqw), g.ptr(&dkw)),
            (g.ptr(&dpos), g.ptr(&dinv), 1.2),
            (g.ptr(&fkc), g.ptr(&fvc), g.ptr(&dslots)),
            tok,
            (nh, nkv, dim),
            1e-6,
        )
        .unwrap();
        // parts
        let (sq, sk, sv) = (up(&q), up(&kk), up(&v));
        let (skc, svc) = (up(&vec![0.0; cache]), up(&vec![0.0; cache]));
        g.rmsnorm(g.ptr(&sq), g.ptr(&dqw), g.ptr(&sq), tok * nh, dim, 1e-6).unwrap();
        g.rmsnorm(g.ptr(&sk), g.ptr(&dkw), g.ptr(&sk), tok * nkv, dim, 1e-6).unwrap();
        g.rope_neox(g.ptr(&sq), g.ptr(&dpos), g.ptr(&dinv), 1.2, tok, nh, dim).unwrap();
        g.rope_neox(g.ptr(&sk), g.ptr(&dpos), g.ptr(&dinv), 1.2, tok, nkv, dim).unwrap();
        g.kv_write(g.ptr(&sk), g.ptr(&sv), g.ptr(&skc), g.ptr(&svc), g.ptr(&dslots), tok, nkv * dim).unwrap();
        close("qk_norm_rope_kv q", &g.download(&fq).unwrap(), &g.download(&sq).unwrap(), 1e-6);
        close("qk_norm_rope_kv k", &g.download(&fk).unwrap(), &g.download(&sk).unwrap(), 1e-6);
        close("qk_norm_rope_kv k cache", &g.download(&fkc).unwrap(), &g.download(&skc).unwrap(), 1e-6);
        close("qk_norm_rope_kv v cache", &g.download(&fvc).unwrap(), &g.download(&svc).unwrap(), 0.0);

        // add_rmsnorm = add_inplace + rmsnorm, from device memory (a row held in
        // registers, and a wider one that takes the loop) and from mapped host memory
        for w in [4100, 2048] {
            let r = 3;
            let (x, y, wt) = (rnd(r * w, 70), rnd(r * w, 71), rnd(w, 72));
            let (dx, dy, dw) = (up(&x), up(&y), up(&wt));
            let (out, want) = (g.alloc::<f32>(r * w).unwrap(), g.alloc::<f32>(r * w).unwrap());
            g.add_rmsnorm(g.ptr(&dx), g.ptr(&dy), false, g.ptr(&dw), g.ptr(&out), r, w, 1e-6, None).unwrap();
            let dx2 = up(&x);
            g.add_inplace(g.ptr(&dx2), g.ptr(&dy), r * w).unwrap();
            g.rmsnorm(g.ptr(&dx2), g.ptr(&dw), g.ptr(&want), r, w, 1e-6).unwrap();
            close(&format!("add_rmsnorm x, width {w}"), &g.download(&dx).unwrap(), &g.download(&dx2).unwrap(), 0.0);
            close(&format!("add_rmsnorm out, width {w}"), &g.download(&out).unwrap(), &g.download(&want).unwrap(), 0.0);
        }
        let (r, w) = (3, 2048);
        let (x, y, wt) = (rnd(r * w, 70), rnd(r * w, 71), rnd(w, 72));
        let dw = up(&wt);
        let (out, want) = (g.alloc::<f32>(r * w).unwrap(), g.alloc::<f32>(r * w).unwrap());
        let (dx2, dy) = (up(&x), up(&y));
        g.add_inplace(g.ptr(&dx2), g.ptr(&dy), r * w).unwrap();
        g.rmsnorm(g.ptr(&dx2), g.ptr(&dw), g.ptr(&want), r, w, 1e-6).unwrap();
        // ... with the kernel first polling a mapped flag the host has set
        let mapped = g.alloc_mapped(r * w * 4 + 4).unwrap();
        std::ptr::copy_nonoverlapping(y.as_ptr(), mapped.host_ptr() as *mut f32, r * w);
        *(mapped.host_ptr().add(r * w * 4) as *mut u32) = 7;
        let flag = Some((mapped.dev_ptr() + (r * w * 4) as u64, 7));
        let dx3 = up(&x);
        g.add_rmsnorm(g.ptr(&dx3), mapped.dev_ptr(), true, g.ptr(&dw), g.ptr(&out), r, w, 1e-6, flag).unwrap();
        close("add_rmsnorm from mapped memory", &g.download(&out).unwrap(), &g.download(&want).unwrap(), 0.0);

        // gemv_add_rmsnorm = gemv_bf16 + add_rmsnorm (twice: the grid counter
        // resets), for a batch, one token (the `_t1` kernel) and a width past the
        // in-register tail
        for (t, n, k) in [(2, 2048, 512), (1, 2048, 768), (1, 2600, 264)] {
            let (xa, wo, res, nw) = (rnd(t * k, 80), bf(&rnd(n * k, 81)), rnd(t * n, 82), rnd(n, 83));
            let (dxa, dwo, dnw) = (up(&xa), g.upload(&wo).unwrap(), up(&nw));
            let (y1, y2) = (g.alloc::<f32>(t * n).unwrap(), g.alloc::<f32>(t * n).unwrap());
            let (o1, o2) = (g.alloc::<f32>(t * n).unwrap(), g.alloc::<f32>(t * n).unwrap());
            for round in 0..2 {
                let (r1, r2) = (up(&res), up(&res));
                g.gemv_add_rmsnorm(
                    (g.ptr(&dxa), g.ptr(&dwo), g.ptr(&y1)),
                    (t, n, k),
                    g.ptr(&r1),
                    g.ptr(&dnw),
                    g.ptr(&o1),
                    1e-6,
                )
                .unwrap();
                g.gemv_bf16(g.ptr(&dxa), g.ptr(&dwo), g.ptr(&y2), t, n, k).unwrap();
                g.add_rmsnorm(g.ptr(&r2), g.ptr(&y2), false, g.ptr(&dnw), g.ptr(&o2), t, n, 1e-6, None).unwrap();
                close(
                    &format!("gemv_add_rmsnorm y ({round})"),
                    &g.download(&y1).unwrap(),
                    &g.download(&y2).unwrap(),
                    0.0,
                );
                close(
                    &format!("gemv_add_rmsnorm res ({round})"),
                    &g.download(&r1).unwrap(),
                    &g.download(&r2).unwrap(),
                    0.0,
                );
                close(
                    &format!("gemv_add_rmsnorm out ({round})"),
                    &g.download(&o1).unwrap(),
                    &g.download(&o2).unwrap(),
                    0.0,
                );
            }
        }

        // router_fused = gemv_bf16 + router_topk; with a handoff it also copies the
        // hidden states to mapped memory and sets the flags. A batch and one token
        // (the `_t1` kernel, launched with two warps per block).
        for t in [3, 1] {
            let (e, kk, h) = (128, 8, 256);
            let (xa, wr) = (rnd(t * h, 90), bf(&rnd(e * h, 91)));
            let (dxa, dwr) = (up(&xa), g.upload(&wr).unwrap());
            let (l1, l2) = (g.alloc::<f32>(t * e).unwrap(), g.alloc::<f32>(t * e).unwrap());
            let (i1, i2) = (g.alloc::<i32>(t * kk).unwrap(), g.alloc::<i32>(t * kk).unwrap());
            let (w1, w2) = (g.alloc::<f32>(t * kk).unwrap(), g.alloc::<f32>(t * kk).unwrap());
            g.gemv_bf16(g.ptr(&dxa), g.ptr(&dwr), g.ptr(&l2), t, e, h).unwrap();
            g.router_topk(g.ptr(&l2), t, e, kk, true, g.ptr(&i2), g.ptr(&w2)).unwrap();
            let region = g.alloc_mapped(t * h * 4 + 12).unwrap();
            let base = region.host_ptr();
            std::ptr::write_bytes(base, 0xff, t * h * 4 + 12);
            let at = |off: usize| region.dev_ptr() + off as u64;
            let handoff = RouterHandoff {
                hidden: at(0),
                done: at(t * h * 4),
                n_tokens: at(t * h * 4 + 4),
                doorbell: Some((at(t * h * 4 + 8), 42)),
            };
            for handoff in [None, Some(handoff)] {
                let (dl, di, dw) = (g.ptr(&l1), g.ptr(&i1), g.ptr(&w1));
                g.router_fused((g.ptr(&dxa), g.ptr(&dwr), dl), (t, e, kk, true), h, (di, dw), handoff).unwrap();
                close(
                    &format!("router_fused logits, t {t}"),
                    &g.download(&l1).unwrap(),
                    &g.download(&l2).unwrap(),
                    0.0,
                );
                assert_eq!(g.download(&i1).unwrap(), g.download(&i2).unwrap(), "router_fused ids, t {t}");
                close(
                    &format!("router_fused weights, t {t}"),
                    &g.download(&w1).unwrap(),
                    &g.download(&w2).unwrap(),
                    0.0,
                );
            }
            g.synchronize().unwrap();
            let copied = std::slice::from_raw_parts(base as *const f32, t * h);
            assert_eq!(copied, &xa[..], "router_fused copies the hidden states");
            let flags = std::slice::from_raw_parts(base.add(t * h * 4) as *const u32, 3);
            assert_eq!(
                flags,
                &[0, t as u32, 42],
                "router_fused clears done, records the token count, rings the doorbell"
            );
        }
    }
}
