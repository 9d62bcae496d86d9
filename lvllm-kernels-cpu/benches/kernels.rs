//! Criterion bench of the packed block kernel per format and ISA, at decode
//! (m = 1) and tile (m = 6) sizes, k = 2048. Throughput is weight bytes read.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lvllm_kernels_cpu::packed::{gemm_block_isa, pack_block, WeightFormat, BLOCK_ROWS};
use lvllm_kernels_cpu::simd::Isa;

fn bench(c: &mut Criterion) {
    let k = 2048;
    // 64 blocks = 2048 rows, so weights (≥ 2 MiB) come from L2/L3 like a real GEMV.
    let n_blocks = 64;
    let rows: Vec<Vec<f32>> =
        (0..BLOCK_ROWS).map(|r| (0..k).map(|i| ((r * 31 + i * 17) % 97) as f32 / 97.0 - 0.5).collect()).collect();
    let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
    let mut g = c.benchmark_group("gemm_block");
    for format in [WeightFormat::Bf16, WeightFormat::Fp8, WeightFormat::Int4 { group: 32 }] {
        let bb = format.block_bytes(k);
        let mut blocks = vec![0u8; bb * n_blocks];
        for b in blocks.chunks_exact_mut(bb) {
            pack_block(format, &refs, k, b);
        }
        for isa in Isa::available() {
            for m in [1usize, 6] {
                let x = vec![0.5f32; m * k];
                let mut out = vec![0f32; m * BLOCK_ROWS];
                g.throughput(Throughput::Bytes((format.bytes_read(k) * n_blocks) as u64));
                let id = BenchmarkId::new(format!("{format:?}/{isa:?}"), m);
                g.bench_with_input(id, &m, |b, &m| {
                    b.iter(|| {
                        for blk in blocks.chunks_exact(bb) {
                            gemm_block_isa(isa, format, blk, k, &x, k, m, &mut out, BLOCK_ROWS);
                        }
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
