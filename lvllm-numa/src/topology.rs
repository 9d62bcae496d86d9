//! Machine topology: NUMA nodes, their logical CPUs and memory, physical cores
//! and their SMT siblings, and the node nearest a PCI device (a GPU).
//!
//! Three sources build the same [`Topology`] value:
//! - sysfs ([`Topology::detect`] reads `/sys`, [`Topology::from_sysfs`] any tree
//!   laid out like it, which is how the tests fake 2- and 8-node machines);
//! - hwloc ([`Topology::from_hwloc`], feature `hwloc`);
//! - [`Topology::synthetic`], for tests and for planning on a machine other than
//!   the one that will run.
//!
//! Only *usable* CPUs appear: online ones, and for [`Topology::detect`] only those
//! in the process's affinity mask. A node left with no usable CPU (a memory-only
//! node, or one outside our cpuset) is dropped, so every node in
//! [`Topology::nodes`] can run workers. Node ids are the kernel's (sparse ids stay
//! sparse); core ids are a dense numbering of this topology's physical cores.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Largest logical CPU id we accept from sysfs (guards against absurd ranges).
const MAX_CPU_ID: usize = 1 << 16;

/// One physical core and its logical CPUs (SMT siblings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Core {
    /// Dense index of this core in the topology (0..`num_physical_cores`, in node
    /// order). Not the kernel's `core_id`, which repeats across packages.
    pub id: usize,
    /// Logical CPUs of this core, ascending; the first is the primary one that
    /// `Binding::CpuCore` pins to.
    pub cpus: Vec<usize>,
}

/// One NUMA node: its CPUs, physical cores and memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    /// The kernel's node id (what `mbind` and `Placement::Node` take).
    pub id: usize,
    /// Usable logical CPUs of the node, ascending.
    pub cpus: Vec<usize>,
    /// Physical cores of the node, ordered by primary CPU.
    pub cores: Vec<Core>,
    /// Memory attached to the node (`MemTotal` of the node's `meminfo`), if known.
    pub memory_bytes: Option<u64>,
}

/// The NUMA nodes of a machine (or a synthetic one). Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    nodes: Vec<NumaNode>,
    /// Root of the sysfs tree this came from, for PCI lookups; `None` when synthetic.
    sysfs_root: Option<PathBuf>,
}

impl Topology {
    /// Detects the topology of this machine from `/sys`, keeping only the CPUs in
    /// the calling thread's affinity mask (`sched_getaffinity`), so a process
    /// started under `taskset` or in a cpuset sees only its CPUs.
    ///
    /// Without sysfs (another OS, or `/sys` not mounted) this falls back to one node
    /// holding the allowed CPUs, or `available_parallelism()` CPUs numbered from 0,
    /// each its own core.
    pub fn detect() -> Result<Topology> {
        let root = Path::new("/sys");
        let allowed = crate::sys::allowed_cpus();
        if cfg!(target_os = "linux") && root.join("devices/system/cpu").is_dir() {
            let topo = Topology::from_sysfs(root)?;
            return match allowed {
                Some(cpus) => topo.restricted_to(&cpus),
                None => Ok(topo),
            };
        }
        let cpus = allowed.unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (0..n).collect()
        });
        Ok(Topology::single_node(cpus))
    }

    /// Reads a topology from a sysfs tree rooted at `root` (normally `/sys`):
    /// `devices/system/cpu/{online,cpuN/topology/*}`, `devices/system/node/{online,
    /// nodeN/{cpulist,meminfo}}`. All online CPUs are kept (no affinity filtering:
    /// see [`Topology::restricted_to`]). A tree without `devices/system/node` is one
    /// node 0 holding every online CPU.
    pub fn from_sysfs(root: &Path) -> Result<Topology> {
        let cpu_dir = root.join("devices/system/cpu");
        let online = online_cpus(&cpu_dir)?;
        let node_dir = root.join("devices/system/node");
        let mut raw_nodes: Vec<(usize, Vec<usize>, Option<u64>)> = Vec::new();
        if node_dir.is_dir() {
            for id in node_ids(&node_dir)? {
                let dir = node_dir.join(format!("node{id}"));
                let list_path = dir.join("cpulist");
                let cpus = parse_cpulist(&read(&list_path)?, &list_path)?;
                let cpus: Vec<usize> = cpus.into_iter().filter(|c| online.contains(c)).collect();
                let memory = fs::read_to_string(dir.join("meminfo")).ok().and_then(|s| parse_mem_total(&s));
                raw_nodes.push((id, cpus, memory));
            }
        }
        if raw_nodes.is_empty() {
            raw_nodes.push((0, online.iter().copied().collect(), None));
        }
        let mut nodes = Vec::new();
        for (id, cpus, memory_bytes) in raw_nodes {
            if cpus.is_empty() {
                continue;
            }
            let cores = group_cores(&cpu_dir, &cpus);
            nodes.push(NumaNode { id, cpus, cores, memory_bytes });
        }
        Topology::finish(nodes, Some(root.to_path_buf()))
    }

    /// A made-up machine: `nodes` nodes of `cores_per_node` cores with
    /// `threads_per_core` SMT threads each. CPUs are numbered the way Linux numbers
    /// them: all primaries first (node 0's cores, then node 1's, ...), then every
    /// core's second sibling in the same order, and so on. Each node gets no memory
    /// size. Zero arguments are treated as 1.
    pub fn synthetic(nodes: usize, cores_per_node: usize, threads_per_core: usize) -> Topology {
        let (nodes, cores_per_node, threads_per_core) = (nodes.max(1), cores_per_node.max(1), threads_per_core.max(1));
        let total_cores = nodes * cores_per_node;
        let node_list = (0..nodes)
            .map(|n| {
                let cores: Vec<Core> = (0..cores_per_node)
                    .map(|c| {
                        let primary = n * cores_per_node + c;
                        Core { id: primary, cpus: (0..threads_per_core).map(|t| primary + t * total_cores).collect() }
                    })
                    .collect();
                let mut cpus: Vec<usize> = cores.iter().flat_map(|c| c.cpus.iter().copied()).collect();
                cpus.sort_unstable();
                NumaNode { id: n, cpus, cores, memory_bytes: None }
            })
            .collect();
        Topology { nodes: node_list, sysfs_root: None }
    }

    /// One node 0 whose CPUs are each their own core.
    fn single_node(cpus: Vec<usize>) -> Topology {
        let cores = cpus.iter().enumerate().map(|(id, &c)| Core { id, cpus: vec![c] }).collect();
        Topology { nodes: vec![NumaNode { id: 0, cpus, cores, memory_bytes: None }], sysfs_root: None }
    }

    /// This topology with only the CPUs in `allowed`; cores and nodes left empty are
    /// dropped and core ids renumbered. Fails with [`Error::NoCpus`] when nothing is left.
    pub fn restricted_to(&self, allowed: &[usize]) -> Result<Topology> {
        let allowed: BTreeSet<usize> = allowed.iter().copied().collect();
        let nodes = self
            .nodes
            .iter()
            .map(|n| NumaNode {
                id: n.id,
                cpus: n.cpus.iter().copied().filter(|c| allowed.contains(c)).collect(),
                cores: n
                    .cores
                    .iter()
                    .map(|c| Core { id: c.id, cpus: c.cpus.iter().copied().filter(|c| allowed.contains(c)).collect() })
                    .filter(|c| !c.cpus.is_empty())
                    .collect(),
                memory_bytes: n.memory_bytes,
            })
            .filter(|n| !n.cpus.is_empty())
            .collect();
        Topology::finish(nodes, self.sysfs_root.clone())
    }

    /// Renumbers core ids densely and checks that some CPU is left.
    fn finish(mut nodes: Vec<NumaNode>, sysfs_root: Option<PathBuf>) -> Result<Topology> {
        if nodes.is_empty() {
            return Err(Error::NoCpus);
        }
        for (id, core) in nodes.iter_mut().flat_map(|n| n.cores.iter_mut()).enumerate() {
            core.id = id;
        }
        Ok(Topology { nodes, sysfs_root })
    }

    /// Builds a topology from explicit nodes (used by the hwloc reader). Core ids are
    /// renumbered; nodes without CPUs are dropped; a node whose CPUs belong to no
    /// core gets one core per CPU.
    #[cfg_attr(not(feature = "hwloc"), allow(dead_code))]
    pub(crate) fn from_nodes(nodes: Vec<NumaNode>) -> Result<Topology> {
        let nodes = nodes
            .into_iter()
            .filter(|n| !n.cpus.is_empty())
            .map(|mut n| {
                if n.cores.is_empty() {
                    n.cores = n.cpus.iter().map(|&c| Core { id: 0, cpus: vec![c] }).collect();
                }
                n
            })
            .collect();
        Topology::finish(nodes, Some(PathBuf::from("/sys")))
    }

    /// The nodes, in ascending id order, each with at least one usable CPU.
    pub fn nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    /// Position in [`Topology::nodes`] of the node with kernel id `id`.
    pub fn node_index(&self, id: usize) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Number of usable physical cores (SMT siblings counted once).
    pub fn num_physical_cores(&self) -> usize {
        self.nodes.iter().map(|n| n.cores.len()).sum()
    }

    /// Number of usable logical CPUs.
    pub fn num_cpus(&self) -> usize {
        self.nodes.iter().map(|n| n.cpus.len()).sum()
    }

    /// The NUMA node (kernel id, like [`NumaNode::id`]) that the PCI device `bus_id`
    /// is attached to, from `bus/pci/devices/<bus_id>/numa_node`.
    ///
    /// `bus_id` may be sysfs style (`0000:01:00.0`), CUDA style (`00000000:01:00.0`,
    /// upper or lower case) or lack the domain (`01:00.0`). Returns `None` when the
    /// device or file is missing, when the kernel reports `-1` (single-node VMs such
    /// as the GPU box do), or for a synthetic topology; callers then use node 0.
    pub fn node_of_pci_device(&self, bus_id: &str) -> Option<usize> {
        let root = self.sysfs_root.as_ref()?;
        let id = normalize_pci_bus_id(bus_id)?;
        let text = fs::read_to_string(root.join("bus/pci/devices").join(id).join("numa_node")).ok()?;
        let node: i64 = text.trim().parse().ok()?;
        usize::try_from(node).ok()
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} NUMA node(s), {} cores, {} CPUs:", self.nodes.len(), self.num_physical_cores(), self.num_cpus())?;
        for n in &self.nodes {
            write!(f, " [node {}: {} cores / {} CPUs", n.id, n.cores.len(), n.cpus.len())?;
            if let Some(m) = n.memory_bytes {
                write!(f, ", {:.1} GiB", m as f64 / (1u64 << 30) as f64)?;
            }
            write!(f, "]")?;
        }
        Ok(())
    }
}

/// Reads a whole file, mapping failure to [`Error::Io`].
fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// Online CPUs: `cpu/online` if present, else every `cpuN` directory whose
/// `online` file is absent (cpu0 often has none) or reads 1.
fn online_cpus(cpu_dir: &Path) -> Result<BTreeSet<usize>> {
    let online_path = cpu_dir.join("online");
    if online_path.is_file() {
        return Ok(parse_cpulist(&read(&online_path)?, &online_path)?.into_iter().collect());
    }
    let mut cpus = BTreeSet::new();
    for id in numbered_entries(cpu_dir, "cpu")? {
        let flag = fs::read_to_string(cpu_dir.join(format!("cpu{id}/online"))).unwrap_or_else(|_| "1".into());
        if flag.trim() != "0" {
            cpus.insert(id);
        }
    }
    Ok(cpus)
}

/// Node ids: `node/online` if present, else every `nodeN` directory.
fn node_ids(node_dir: &Path) -> Result<Vec<usize>> {
    let online = node_dir.join("online");
    if online.is_file() {
        let ids = parse_cpulist(&read(&online)?, &online)?;
        // A listed node without a directory has nothing we can read: skip it.
        return Ok(ids.into_iter().filter(|id| node_dir.join(format!("node{id}")).is_dir()).collect());
    }
    numbered_entries(node_dir, "node")
}

/// Ascending `N` of the entries of `dir` named `{prefix}N`.
fn numbered_entries(dir: &Path, prefix: &str) -> Result<Vec<usize>> {
    let entries = fs::read_dir(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let mut ids: Vec<usize> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok())
        .filter(|&id| id <= MAX_CPU_ID)
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Groups a node's CPUs into physical cores using each CPU's `core_cpus_list`
/// (or the older `thread_siblings_list`); a CPU without either is its own core.
/// Greedy, so an inconsistent tree still puts every CPU in exactly one core.
fn group_cores(cpu_dir: &Path, node_cpus: &[usize]) -> Vec<Core> {
    let in_node: BTreeSet<usize> = node_cpus.iter().copied().collect();
    let mut assigned = BTreeSet::new();
    let mut cores = Vec::new();
    for &cpu in node_cpus {
        if assigned.contains(&cpu) {
            continue;
        }
        let topo = cpu_dir.join(format!("cpu{cpu}/topology"));
        let siblings = ["core_cpus_list", "thread_siblings_list"]
            .iter()
            .find_map(|f| {
                let p = topo.join(f);
                parse_cpulist(&fs::read_to_string(&p).ok()?, &p).ok()
            })
            .unwrap_or_default();
        // Every lower CPU was visited (and assigned) already, so `cpu` comes first:
        // the primary is the lowest id, as in Linux's numbering.
        let cpus: Vec<usize> = siblings
            .into_iter()
            .filter(|c| in_node.contains(c) && !assigned.contains(c))
            .chain(std::iter::once(cpu))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assigned.extend(cpus.iter().copied());
        cores.push(Core { id: 0, cpus });
    }
    cores
}

/// Parses a kernel CPU/node list such as `0-3,8,10-11` (empty means none).
pub(crate) fn parse_cpulist(text: &str, path: &Path) -> Result<Vec<usize>> {
    let err = |msg: String| Error::Parse { path: path.to_path_buf(), msg };
    let mut out = BTreeSet::new();
    for part in text.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo.parse().map_err(|_| err(format!("bad list item {part:?}")))?;
        let hi: usize = hi.parse().map_err(|_| err(format!("bad list item {part:?}")))?;
        if lo > hi || hi > MAX_CPU_ID {
            return Err(err(format!("bad range {part:?}")));
        }
        out.extend(lo..=hi);
    }
    Ok(out.into_iter().collect())
}

/// `MemTotal` in bytes from a node `meminfo` (`Node 0 MemTotal:  32768 kB`).
fn parse_mem_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.contains("MemTotal:"))?;
    let mut words = line.split(':').nth(1)?.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let scale = match words.next() {
        Some("kB") => 1024,
        Some("MB") => 1 << 20,
        Some("GB") => 1 << 30,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(scale)
}

/// Turns a PCI bus id into the sysfs directory name `dddd:bb:dd.f`; `None` if it is
/// not a bus id (so nothing outside `bus/pci/devices` can be named).
fn normalize_pci_bus_id(bus_id: &str) -> Option<String> {
    let id = bus_id.trim().to_ascii_lowercase();
    let mut parts: Vec<&str> = id.split(':').collect();
    if parts.len() == 2 {
        parts.insert(0, "0000");
    }
    let [domain, bus, devfn] = parts.as_slice() else { return None };
    // CUDA prints a 32-bit domain (`00000000`); sysfs prints 16 bits.
    let domain = if domain.len() > 4 { &domain[domain.len() - 4..] } else { domain };
    let (dev, func) = devfn.split_once('.')?;
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    (hex(domain, 4) && hex(bus, 2) && hex(dev, 2) && hex(func, 1)).then(|| format!("{domain}:{bus}:{dev}.{func}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists_parse() {
        let p = Path::new("x");
        assert_eq!(parse_cpulist("0-3,8,10-11\n", p).unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist("\n", p).unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpulist("5", p).unwrap(), vec![5]);
        for bad in ["a", "3-1", "0-99999999", "1-", "-"] {
            assert!(matches!(parse_cpulist(bad, p), Err(Error::Parse { .. })), "{bad}");
        }
    }

    #[test]
    fn meminfo_parses() {
        let s = "Node 0 MemTotal:       32768 kB\nNode 0 MemFree: 1 kB\n";
        assert_eq!(parse_mem_total(s), Some(32768 * 1024));
        assert_eq!(parse_mem_total("nothing"), None);
    }

    #[test]
    fn pci_ids_normalize() {
        assert_eq!(normalize_pci_bus_id("0000:01:00.0").as_deref(), Some("0000:01:00.0"));
        assert_eq!(normalize_pci_bus_id("00000000:C1:00.0").as_deref(), Some("0000:c1:00.0"));
        assert_eq!(normalize_pci_bus_id("01:00.0").as_deref(), Some("0000:01:00.0"));
        for bad in ["", "../../etc", "0000:01:00", "0000:01:00.0/..", "zz:00.0"] {
            assert_eq!(normalize_pci_bus_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn synthetic_numbers_cpus_like_linux() {
        let t = Topology::synthetic(2, 4, 2);
        assert_eq!(t.nodes().len(), 2);
        assert_eq!(t.num_physical_cores(), 8);
        assert_eq!(t.num_cpus(), 16);
        assert_eq!(t.nodes()[0].cpus, vec![0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(t.nodes()[1].cores[0], Core { id: 4, cpus: vec![4, 12] });
        assert_eq!(t.node_of_pci_device("0000:01:00.0"), None);
        let one = Topology::synthetic(0, 0, 0);
        assert_eq!((one.nodes().len(), one.num_physical_cores(), one.num_cpus()), (1, 1, 1));
    }

    #[test]
    fn restriction_drops_empty_cores_and_nodes() {
        let t = Topology::synthetic(2, 2, 2); // node0: cores {0,4},{1,5}; node1: {2,6},{3,7}
        let r = t.restricted_to(&[1, 5, 4]).unwrap();
        assert_eq!(r.nodes().len(), 1);
        assert_eq!(r.nodes()[0].cores, vec![Core { id: 0, cpus: vec![4] }, Core { id: 1, cpus: vec![1, 5] }]);
        assert!(matches!(t.restricted_to(&[99]), Err(Error::NoCpus)));
    }

    #[test]
    fn detect_finds_this_machine() {
        let t = Topology::detect().unwrap();
        assert!(t.num_cpus() >= 1);
        assert!(t.num_physical_cores() >= 1 && t.num_physical_cores() <= t.num_cpus());
        let allowed = crate::sys::allowed_cpus();
        if let Some(allowed) = allowed {
            let all: Vec<usize> = t.nodes().iter().flat_map(|n| n.cpus.iter().copied()).collect();
            assert!(all.iter().all(|c| allowed.contains(c)));
        }
        assert!(!t.to_string().is_empty());
    }
}
