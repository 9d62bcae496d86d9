//! Prints the memory read bandwidth measured by `lvllm_numa::bandwidth::probe`
//! for 1..N worker threads (N = usable logical CPUs), one pool per count.
//!
//! Usage: `cargo run --release -p lvllm-numa --example bandwidth -- [MiB per node] [reps] [max threads]`
//! (defaults: 1024 MiB, 5 reps, every CPU). Use buffers far larger than the
//! last-level cache.

use lvllm_numa::{bandwidth, Binding, HostBuffer, Placement, Pool, PoolOptions, Topology, HUGE_PAGE_SIZE};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let reps: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let topo = Topology::detect()?;
    let max_threads: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(topo.num_cpus());
    println!("{topo}");
    let probe_buf = HostBuffer::new(HUGE_PAGE_SIZE, Placement::Node(topo.nodes()[0].id))?;
    println!(
        "mbind to node {}: {}; huge-page advice: {}",
        topo.nodes()[0].id,
        if probe_buf.bound() { "applied" } else { "refused (pages follow first touch)" },
        if probe_buf.huge_pages() { "accepted" } else { "refused" }
    );
    println!("buffer {mib} MiB per node, best of {reps}");
    println!("{:>7} {:>5} {:>6} {:>9}  per node GB/s", "threads", "nodes", "pinned", "GB/s");
    for threads in 1..=max_threads {
        let pool =
            Pool::new(&topo, PoolOptions { threads: Some(threads), binding: Binding::CpuCore, power_saving: false })?;
        let r = bandwidth::probe(&pool, mib << 20, reps)?;
        let per_node: Vec<String> = r.per_node_gb_per_s.iter().map(|g| format!("{g:.1}")).collect();
        println!(
            "{:>7} {:>5} {:>6} {:>9.1}  {}",
            r.threads,
            pool.num_nodes(),
            pool.pinned_threads(),
            r.gb_per_s,
            per_node.join(" ")
        );
    }
    Ok(())
}
