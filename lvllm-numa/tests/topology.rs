//! Topology from fake sysfs trees: 2 nodes × 4 SMT cores, 8 sparse nodes with a
//! memory-only node, offline CPUs, no node directory, PCI `numa_node` of -1.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use lvllm_numa::{Core, Error, Pool, PoolOptions, Topology};

/// A sysfs-like tree in a fresh temporary directory, removed on drop.
struct FakeSysfs {
    root: PathBuf,
}

impl FakeSysfs {
    fn new() -> FakeSysfs {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "lvllm-numa-sysfs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(root.join("devices/system/cpu")).unwrap();
        FakeSysfs { root }
    }

    fn write(&self, rel: &str, text: &str) -> &Self {
        let p = self.root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
        self
    }

    /// CPU `id` whose core holds `siblings` (as `core_cpus_list`).
    fn cpu(&self, id: usize, siblings: &str) -> &Self {
        self.write(&format!("devices/system/cpu/cpu{id}/topology/core_cpus_list"), &format!("{siblings}\n"))
    }

    fn node(&self, id: usize, cpulist: &str, mem_kb: u64) -> &Self {
        self.write(&format!("devices/system/node/node{id}/cpulist"), &format!("{cpulist}\n"));
        self.write(
            &format!("devices/system/node/node{id}/meminfo"),
            &format!("Node {id} MemTotal:       {mem_kb} kB\nNode {id} MemFree:        1 kB\n"),
        )
    }

    fn path(&self) -> &Path {
        &self.root
    }
}

impl Drop for FakeSysfs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// 2 nodes × 4 cores × 2 threads, numbered like Linux: siblings `i` and `i + 8`.
fn two_by_four_smt() -> FakeSysfs {
    let s = FakeSysfs::new();
    s.write("devices/system/cpu/online", "0-15\n").write("devices/system/node/online", "0-1\n");
    for i in 0..8 {
        s.cpu(i, &format!("{},{}", i, i + 8)).cpu(i + 8, &format!("{},{}", i, i + 8));
    }
    s.node(0, "0-3,8-11", 16 << 20).node(1, "4-7,12-15", 16 << 20);
    s
}

#[test]
fn two_nodes_four_smt_cores() {
    let s = two_by_four_smt();
    let t = Topology::from_sysfs(s.path()).unwrap();
    assert_eq!(t.nodes().len(), 2);
    assert_eq!(t.num_physical_cores(), 8);
    assert_eq!(t.num_cpus(), 16);
    let n1 = &t.nodes()[1];
    assert_eq!(n1.id, 1);
    assert_eq!(n1.cpus, vec![4, 5, 6, 7, 12, 13, 14, 15]);
    assert_eq!(n1.cores[0], Core { id: 4, cpus: vec![4, 12] });
    assert_eq!(n1.memory_bytes, Some(16 << 30));
    // The synthetic twin describes the same machine.
    let syn = Topology::synthetic(2, 4, 2);
    for (a, b) in t.nodes().iter().zip(syn.nodes()) {
        assert_eq!((a.id, &a.cpus, &a.cores), (b.id, &b.cpus, &b.cores));
    }
    // Restricting to a cpuset keeps the SMT grouping of what is left.
    let r = t.restricted_to(&[5, 13, 6]).unwrap();
    assert_eq!(r.nodes().len(), 1);
    assert_eq!(r.nodes()[0].id, 1);
    assert_eq!(r.nodes()[0].cores, vec![Core { id: 0, cpus: vec![5, 13] }, Core { id: 1, cpus: vec![6] }]);
}

#[test]
fn eight_sparse_nodes_and_a_memory_only_node() {
    let s = FakeSysfs::new();
    // Nodes 0, 2, .., 14 with 2 cores each (no SMT), plus node 20: memory, no CPUs.
    s.write("devices/system/cpu/online", "0-15\n");
    for n in 0..8 {
        let (a, b) = (2 * n, 2 * n + 1);
        s.cpu(a, &a.to_string()).cpu(b, &b.to_string()).node(2 * n, &format!("{a}-{b}"), 1 << 20);
    }
    s.node(20, "", 64 << 20);
    let t = Topology::from_sysfs(s.path()).unwrap();
    let ids: Vec<usize> = t.nodes().iter().map(|n| n.id).collect();
    assert_eq!(ids, vec![0, 2, 4, 6, 8, 10, 12, 14]);
    assert_eq!(t.num_physical_cores(), 16);
    assert_eq!(t.node_index(6), Some(3));
    assert_eq!(t.node_index(20), None);
    let core_ids: Vec<usize> = t.nodes().iter().flat_map(|n| n.cores.iter().map(|c| c.id)).collect();
    assert_eq!(core_ids, (0..16).collect::<Vec<_>>());
}

#[test]
fn offline_cpus_are_left_out() {
    // With the global `online` list.
    let s = two_by_four_smt();
    s.write("devices/system/cpu/online", "0-5,7-12,14-15\n");
    let t = Topology::from_sysfs(s.path()).unwrap();
    assert_eq!(t.num_cpus(), 14);
    assert_eq!(t.nodes()[1].cpus, vec![4, 5, 7, 12, 14, 15]);
    // Core 6 (6, 14) keeps its online sibling; core 5 (5, 13) likewise.
    assert!(t.nodes()[1].cores.iter().any(|c| c.cpus == vec![14]));
    assert!(t.nodes()[1].cores.iter().any(|c| c.cpus == vec![5]));
    assert_eq!(t.num_physical_cores(), 8);

    // Without it: per-CPU `online` files (cpu0 has none, as on real machines).
    let s = FakeSysfs::new();
    for i in 0..4 {
        s.cpu(i, &i.to_string());
        if i > 0 {
            s.write(&format!("devices/system/cpu/cpu{i}/online"), if i == 2 { "0\n" } else { "1\n" });
        }
    }
    s.node(0, "0-3", 1024);
    let t = Topology::from_sysfs(s.path()).unwrap();
    assert_eq!(t.nodes()[0].cpus, vec![0, 1, 3]);
}

#[test]
fn no_node_directory_means_one_node() {
    let s = FakeSysfs::new();
    s.write("devices/system/cpu/online", "0-3\n");
    for i in 0..4 {
        s.cpu(i, &format!("{},{}", i & !1, i | 1));
    }
    let t = Topology::from_sysfs(s.path()).unwrap();
    assert_eq!(t.nodes().len(), 1);
    assert_eq!(t.nodes()[0].id, 0);
    assert_eq!(t.num_physical_cores(), 2);
    assert_eq!(t.nodes()[0].memory_bytes, None);
}

#[test]
fn missing_topology_files_make_each_cpu_a_core() {
    let s = FakeSysfs::new();
    s.write("devices/system/cpu/online", "0-2\n").node(0, "0-2", 1);
    let t = Topology::from_sysfs(s.path()).unwrap();
    assert_eq!(t.num_physical_cores(), 3);
}

#[test]
fn pci_numa_node() {
    let s = two_by_four_smt();
    s.write("bus/pci/devices/0000:01:00.0/numa_node", "-1\n")
        .write("bus/pci/devices/0000:c1:00.0/numa_node", "1\n")
        .write("bus/pci/devices/0000:02:00.0/numa_node", "junk\n");
    let t = Topology::from_sysfs(s.path()).unwrap();
    assert_eq!(t.node_of_pci_device("0000:01:00.0"), None, "-1 means unknown");
    assert_eq!(t.node_of_pci_device("0000:c1:00.0"), Some(1));
    assert_eq!(t.node_of_pci_device("00000000:C1:00.0"), Some(1), "CUDA-style id");
    assert_eq!(t.node_of_pci_device("c1:00.0"), Some(1));
    assert_eq!(t.node_of_pci_device("0000:02:00.0"), None);
    assert_eq!(t.node_of_pci_device("0000:03:00.0"), None);
    assert_eq!(t.node_of_pci_device("../../../etc/passwd"), None);
}

#[test]
fn broken_trees_are_errors_not_panics() {
    let missing = std::env::temp_dir().join("lvllm-numa-no-such-sysfs");
    assert!(matches!(Topology::from_sysfs(&missing), Err(Error::Io { .. })));
    let s = FakeSysfs::new();
    s.write("devices/system/cpu/online", "0-3\n").node(0, "0-x", 1);
    assert!(matches!(Topology::from_sysfs(s.path()), Err(Error::Parse { .. })));
    let s = FakeSysfs::new();
    s.write("devices/system/cpu/online", "\n").node(0, "0-3", 1);
    assert!(matches!(Topology::from_sysfs(s.path()), Err(Error::NoCpus)));
}

#[test]
fn a_pool_runs_on_a_fake_topology() {
    // The fake CPUs 8..15 do not exist here: pinning them fails, which is recorded.
    let t = Topology::from_sysfs(two_by_four_smt().path()).unwrap();
    let pool = Pool::new(&t, PoolOptions::default()).unwrap();
    assert_eq!(pool.num_threads(), 4);
    assert_eq!((pool.threads_on_node(0), pool.threads_on_node(1)), (2, 2));
    assert_eq!(pool.thread_cpus(2), Some(&[4usize][..]));
    assert!(pool.pinned_threads() <= 4);
    let hits = AtomicUsize::new(0);
    pool.parallel_for_nodes(&[3, 5], |_, _| {
        hits.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(hits.into_inner(), 8);
}
