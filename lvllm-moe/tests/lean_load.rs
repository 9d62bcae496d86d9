//! Lean loading: repacking a layer's experts from a memory-mapped checkpoint, with
//! each expert's pages released after it is packed, keeps the peak resident
//! memory near the packed size (≤ 1.25×). Linux only (reads `/proc/self/status`).
//! Its own test binary, so no other test allocates meanwhile.
#![cfg(target_os = "linux")]

use std::io::Write;
use std::sync::Arc;

use lvllm_moe::{CpuExperts, ExpertMatrix, ExpertWeights, ExpertsOptions, MoeWeight};
use lvllm_numa::{Binding, Pool, PoolOptions, Topology};
use lvllm_tensor::{Backing, DType, HostTensor};

fn status_kib(key: &str) -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Writes a safetensors file of `n` experts (gate, up, down in bf16) without
/// holding it in memory; returns (path, byte offset of each tensor).
fn write_checkpoint(dir: &std::path::Path, n: usize, h: usize, i: usize) -> (std::path::PathBuf, Vec<[usize; 3]>) {
    let mut header = serde_json_lite(n, h, i);
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let path = dir.join("experts.safetensors");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    let data_start = 8 + header.len();
    let mut offsets = Vec::new();
    let mut off = data_start;
    let mut s = 7u32;
    let mut row = vec![0u8; 2 * h.max(i)];
    for _ in 0..n {
        let mut o = [0; 3];
        for (j, (rows, cols)) in [(i, h), (i, h), (h, i)].into_iter().enumerate() {
            o[j] = off;
            for _ in 0..rows {
                for c in 0..cols {
                    s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    let v = half::bf16::from_f32(((s >> 9) as f32 / (1u32 << 23) as f32 - 0.5) * 0.1);
                    row[2 * c..2 * c + 2].copy_from_slice(&v.to_le_bytes());
                }
                f.write_all(&row[..2 * cols]).unwrap();
            }
            off += rows * cols * 2;
        }
        offsets.push(o);
    }
    f.flush().unwrap();
    (path, offsets)
}

/// The header, written by hand (this test needs no JSON crate).
fn serde_json_lite(n: usize, h: usize, i: usize) -> String {
    let mut parts = Vec::new();
    let mut off = 0;
    for e in 0..n {
        for (name, rows, cols) in [("gate", i, h), ("up", i, h), ("down", h, i)] {
            let len = rows * cols * 2;
            parts.push(format!(
                "\"e{e}.{name}\":{{\"dtype\":\"BF16\",\"shape\":[{rows},{cols}],\"data_offsets\":[{off},{}]}}",
                off + len
            ));
            off += len;
        }
    }
    format!("{{{}}}", parts.join(","))
}

#[test]
fn peak_rss_while_repacking_stays_near_the_packed_size() {
    // 32 experts of the Qwen3-30B-A3B shape: 302 MB of bf16.
    let (n, h, i) = (32, 2048, 768);
    let dir = tempfile::tempdir().unwrap();
    let (path, offsets) = write_checkpoint(dir.path(), n, h, i);
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: a private read-only mapping of a file this test owns and does not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let backing = Arc::new(Backing::Mmap(mmap));
    let view = |off: usize, rows: usize, cols: usize| {
        ExpertMatrix::Dense(HostTensor::view(DType::BF16, [rows, cols], backing.clone(), off, rows * cols * 2).unwrap())
    };
    let experts: Vec<ExpertWeights> = offsets
        .iter()
        .map(|o| ExpertWeights { gate: view(o[0], i, h), up: view(o[1], i, h), down: view(o[2], h, i) })
        .collect();
    let pool = Arc::new(
        Pool::new(
            &Topology::synthetic(1, 1, 1),
            PoolOptions { threads: Some(1), binding: Binding::NumaNode, power_saving: false },
        )
        .unwrap(),
    );
    // Drop the page cache's pages from our RSS and reset the peak.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let base = status_kib("VmRSS:");
    let opts = ExpertsOptions { weight: MoeWeight::Keep, ..Default::default() };
    let release = |w: &ExpertWeights| w.release_pages();
    let layer = CpuExperts::new(pool, experts, h, i, &opts, release).unwrap();
    let peak = status_kib("VmHWM:");
    let packed_kib = layer.regions().iter().map(|r| r.1).sum::<usize>() / 1024;
    let ratio = (peak - base) as f64 / packed_kib as f64;
    println!("packed {packed_kib} KiB, peak RSS growth {} KiB, ratio {ratio:.3}", peak - base);
    assert!(ratio <= 1.25, "peak RSS grew {ratio:.3}× the packed expert bytes");
}
