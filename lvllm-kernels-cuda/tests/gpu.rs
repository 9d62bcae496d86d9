//! GPU kernel tests against CPU references on random inputs. Without a CUDA
//! driver they print why they skip and pass (CI has no GPU); the device script
//! (`scripts/device-gpu-check.sh`) runs them on the GPU machine.

use half::bf16;
use lvllm_kernels_cuda::{Error, Gpu};

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

        // router top-k
        let (tk, e, kk) = (6, 16, 4);
        let lg = rnd(tk * e, 8);
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
                assert_eq!(ids[ti * kk + j] as usize, order[j], "router ids");
                assert!((ws[ti * kk + j] - (row[order[j]] - mx).exp() / sum).abs() < 1e-6, "router weights");
            }
        }

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
