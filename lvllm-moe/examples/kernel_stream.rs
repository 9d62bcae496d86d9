//! One thread streams one big matrix of packed expert blocks (far larger than the
//! last-level cache) through the expert kernels at decode sizes, and compares
//! the rate with a plain read of the same bytes: it shows how close a kernel
//! gets to what one core can pull from DRAM, apart from any pool, task or
//! routing overhead.
//!
//! ```text
//! cargo run --release -p lvllm-moe --example kernel_stream -- [--mib 1024] [--k 2048] [--m 1] [--reps 3] [--blocks-per-run 2]
//! ```
//! `--blocks-per-run` calls the kernel on runs of that many consecutive blocks,
//! jumping to a random run between them, like a decode task does.

use std::time::Instant;

use lvllm_kernels_cpu::int8act::{self, QuantActs};
use lvllm_kernels_cpu::packed::{self, WeightFormat, BLOCK_ROWS};
use lvllm_numa::{HostBuffer, Placement};

fn main() -> anyhow::Result<()> {
    let (mut mib, mut k, mut m, mut reps, mut run) = (1024usize, 2048usize, 1usize, 3usize, 0usize);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => mib = val()?.parse()?,
            "--k" => k = val()?.parse()?,
            "--m" => m = val()?.parse()?,
            "--reps" => reps = val()?.parse()?,
            "--blocks-per-run" => run = val()?.parse()?,
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
    let mut out = vec![0f32; m * BLOCK_ROWS];
    for (name, format) in [("int4×int8", WeightFormat::Int4 { group }), ("bf16", WeightFormat::Bf16)] {
        let bb = format.block_bytes(k);
        let n = (mib << 20) / bb;
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
        let order: Vec<usize> = if run == 0 {
            vec![0]
        } else {
            let runs = n / run;
            let mut o: Vec<usize> = (0..runs).collect();
            let mut s = 0x9e37_79b9_7f4a_7c15u64;
            for i in (1..runs).rev() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                o.swap(i, (s % (i as u64 + 1)) as usize);
            }
            o
        };
        let per_run = if run == 0 { n } else { run };
        let (mut best_read, mut best_kernel) = (f64::MAX, f64::MAX);
        let mut sink = 0u64;
        for _ in 0..reps {
            let t = Instant::now();
            let mut acc = [0u64; 8];
            for &r in &order {
                for c in data[r * per_run * bb..(r + 1) * per_run * bb].chunks_exact(64) {
                    for (a, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
                        *a = a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
                    }
                }
            }
            sink ^= acc.iter().fold(0, |a, &b| a ^ b);
            best_read = best_read.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for &r in &order {
                for i in r * per_run..(r + 1) * per_run {
                    let block = &data[i * bb..(i + 1) * bb];
                    match format {
                        WeightFormat::Bf16 => packed::gemm_block(format, block, k, &x, k, m, &mut out, BLOCK_ROWS),
                        _ => int8act::gemm_block_i8(format, block, k, &acts, m, &mut out, BLOCK_ROWS),
                    }
                }
            }
            best_kernel = best_kernel.min(t.elapsed().as_secs_f64());
        }
        let bytes = (n * format.bytes_read(k)) as f64;
        let read_gbs = (order.len() * per_run * bb) as f64 / best_read / 1e9;
        let kern_gbs = bytes / best_kernel / 1e9;
        println!(
            "{name} k={k} m={m} runs of {}: kernel {kern_gbs:.1} GB/s, plain read of the same runs {read_gbs:.1} GB/s = {:.0}% ({} MiB, 1 thread; sink {})",
            if run == 0 { "all".to_string() } else { run.to_string() },
            100.0 * kern_gbs / read_gbs,
            (n * bb) >> 20,
            (sink as f32 + out[0]) as u8
        );
    }
    Ok(())
}
