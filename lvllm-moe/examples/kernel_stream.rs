//! Threads stream one big matrix of packed expert blocks (far larger than the
//! last-level cache) through the expert kernels at decode sizes, and compare the
//! rate with a plain read of the same bytes in the same order: how close a
//! kernel gets to what the cores can pull from DRAM, apart from any pool, task
//! or routing overhead.
//!
//! ```text
//! cargo run --release -p lvllm-moe --example kernel_stream -- [--mib 1024] [--k 2048] [--m 1] [--reps 3]
//!     [--threads 1] [--blocks-per-run 0] [--prefetch 2048,0,4096,2048l2]
//! ```
//! Each thread streams its own contiguous share. `--blocks-per-run N` calls the
//! kernel on runs of N consecutive blocks, jumping to a random run of the
//! thread's share between them, like a decode task does (0: one sequential
//! run). `--prefetch` lists software-prefetch settings to compare (bytes ahead;
//! `l2` suffix: into L2 only; 0: off).

use std::time::Instant;

use lvllm_kernels_cpu::int8act::{self, QuantActs};
use lvllm_kernels_cpu::packed::{self, Prefetch, WeightFormat, BLOCK_ROWS};
use lvllm_numa::{HostBuffer, Placement};

/// A random order of `runs` run indices.
fn shuffled(runs: usize, seed: u64) -> Vec<usize> {
    let mut o: Vec<usize> = (0..runs).collect();
    let mut s = seed | 1;
    for i in (1..runs).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        o.swap(i, (s % (i as u64 + 1)) as usize);
    }
    o
}

fn main() -> anyhow::Result<()> {
    let (mut mib, mut k, mut m, mut reps, mut run, mut threads) = (1024usize, 2048usize, 1usize, 3usize, 0usize, 1);
    let mut prefetches = vec![Prefetch::default()];
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => mib = val()?.parse()?,
            "--k" => k = val()?.parse()?,
            "--m" => m = val()?.parse()?,
            "--reps" => reps = val()?.parse()?,
            "--threads" => threads = val()?.parse::<usize>()?.max(1),
            "--blocks-per-run" => run = val()?.parse()?,
            "--prefetch" => {
                prefetches = val()?.split(',').map(str::parse).collect::<Result<_, _>>().map_err(anyhow::Error::msg)?
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let group = 32;
    let (qs, groups) = (int8act::q_stride(k), k.div_ceil(group));
    let (mut q, mut sc, mut su) = (vec![0i8; m * qs], vec![0f32; m * groups], vec![0i32; m * groups]);
    for t in 0..m {
        int8act::quantize_row(
            &x[t * k..(t + 1) * k],
            group,
            &mut q[t * qs..(t + 1) * qs],
            &mut sc[t * groups..(t + 1) * groups],
            &mut su[t * groups..(t + 1) * groups],
        );
    }
    let acts = QuantActs { q: &q, stride: qs, scales: &sc, sums: &su, groups };
    for (name, format) in [("int4×int8", WeightFormat::Int4 { group }), ("bf16", WeightFormat::Bf16)] {
        let bb = format.block_bytes(k);
        let per_thread = (mib << 20) / bb / threads;
        let per_run = if run == 0 { per_thread } else { run.min(per_thread) };
        let runs = per_thread / per_run;
        anyhow::ensure!(runs > 0, "--mib {mib} is too small for {threads} threads");
        let n = per_thread * threads;
        let mut buf = HostBuffer::new(n * bb, Placement::Default)?;
        // One block packed from random weights (normal floats: denormal scales or
        // weights would time microcode assists, not memory), copied everywhere.
        let rows: Vec<Vec<f32>> = (0..BLOCK_ROWS)
            .map(|r| (0..k).map(|c| ((r * 131 + c * 7919) % 2003) as f32 / 1001.0 - 1.0).collect())
            .collect();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let mut one = vec![0u8; bb];
        packed::pack_block(format, &refs, k, &mut one);
        for dst in buf.as_mut_slice().chunks_exact_mut(bb) {
            dst.copy_from_slice(&one);
        }
        let data = buf.as_slice();
        let orders: Vec<Vec<usize>> = (0..threads).map(|t| shuffled(runs, 0x9e37_79b9 + t as u64)).collect();
        // One pass of every thread over its share; returns the slowest thread's seconds.
        let pass = &|kernel: bool| -> f64 {
            let barrier = std::sync::Barrier::new(threads);
            std::thread::scope(|sc| {
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let (order, barrier, x, acts) = (&orders[t], &barrier, &x, &acts);
                        sc.spawn(move || {
                            let share = &data[t * per_thread * bb..(t + 1) * per_thread * bb];
                            let mut out = vec![0f32; m * BLOCK_ROWS];
                            let mut acc = [0u64; 8];
                            barrier.wait();
                            let t0 = Instant::now();
                            for &r in order {
                                let bytes = &share[r * per_run * bb..(r + 1) * per_run * bb];
                                if !kernel {
                                    for c in bytes.chunks_exact(64) {
                                        for (a, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
                                            *a = a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
                                        }
                                    }
                                    continue;
                                }
                                for block in bytes.chunks_exact(bb) {
                                    match format {
                                        WeightFormat::Bf16 => {
                                            packed::gemm_block(format, block, k, x, k, m, &mut out, BLOCK_ROWS)
                                        }
                                        _ => int8act::gemm_block_i8(format, block, k, acts, m, &mut out, BLOCK_ROWS),
                                    }
                                }
                            }
                            let secs = t0.elapsed().as_secs_f64();
                            std::hint::black_box((acc, out));
                            secs
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("stream thread")).fold(0f64, f64::max)
            })
        };
        let read_bytes = (threads * runs * per_run * bb) as f64;
        let kern_bytes = (threads * runs * per_run * format.bytes_read(k)) as f64;
        let read_gbs = read_bytes / (0..reps.max(1)).map(|_| pass(false)).fold(f64::MAX, f64::min) / 1e9;
        for &pf in &prefetches {
            packed::set_prefetch(pf);
            let kern = (0..reps.max(1)).map(|_| pass(true)).fold(f64::MAX, f64::min);
            let kern_gbs = kern_bytes / kern / 1e9;
            println!(
                "{name} k={k} m={m} threads={threads} runs of {} blocks, prefetch {}{}: kernel {kern_gbs:.1} GB/s, plain read {read_gbs:.1} GB/s = {:.0}% ({} MiB)",
                per_run,
                pf.distance,
                if pf.l2 { " (L2)" } else { "" },
                100.0 * kern_gbs / read_gbs,
                (n * bb) >> 20
            );
        }
        packed::set_prefetch(Prefetch::default());
    }
    Ok(())
}
