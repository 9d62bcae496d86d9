//! Topology through hwloc (feature `hwloc`), for machines where sysfs is not the
//! whole story (hwloc also knows Windows, BSDs and odd firmware tables).
//!
//! The result is the same [`Topology`] value as the sysfs reader's: nodes with
//! usable CPUs only, restricted to the CPUs hwloc reports as allowed for this
//! process, cores grouped from hwloc's `Core` objects.

use std::collections::BTreeSet;

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::ObjectType;

use crate::error::{Error, Result};
use crate::topology::{Core, NumaNode, Topology};

impl Topology {
    /// Detects the topology through hwloc, honouring the process's allowed CPUs.
    pub fn from_hwloc() -> Result<Topology> {
        let hw = hwlocality::Topology::new().map_err(|e| Error::Hwloc(e.to_string()))?;
        let allowed: BTreeSet<usize> = hw.allowed_cpuset().iter_set().map(usize::from).collect();
        // SMT sibling groups; a platform without `Core` objects makes each PU a core.
        let mut core_sets: Vec<Vec<usize>> = hw
            .objects_with_type(ObjectType::Core)
            .filter_map(|c| c.cpuset())
            .map(|set| set.iter_set().map(usize::from).filter(|c| allowed.contains(c)).collect::<Vec<_>>())
            .filter(|cpus| !cpus.is_empty())
            .collect();
        if core_sets.is_empty() {
            core_sets = allowed.iter().map(|&c| vec![c]).collect();
        }
        let mut nodes = Vec::new();
        for (index, node) in hw.objects_with_type(ObjectType::NUMANode).enumerate() {
            let Some(set) = node.cpuset() else { continue };
            let cpus: BTreeSet<usize> = set.iter_set().map(usize::from).filter(|c| allowed.contains(c)).collect();
            let memory_bytes = match node.attributes() {
                Some(ObjectAttributes::NUMANode(attr)) => attr.local_memory().map(|m| m.get()),
                _ => None,
            };
            let mut cores: Vec<Core> = core_sets
                .iter()
                .map(|core| Core { id: 0, cpus: core.iter().copied().filter(|c| cpus.contains(c)).collect() })
                .filter(|core| !core.cpus.is_empty())
                .collect();
            cores.sort_by_key(|c| c.cpus[0]);
            let id = node.os_index().unwrap_or(index);
            nodes.push(NumaNode { id, cpus: cpus.into_iter().collect(), cores, memory_bytes });
        }
        if nodes.is_empty() {
            // hwloc always reports at least one NUMA node; be safe anyway.
            let cpus: Vec<usize> = allowed.iter().copied().collect();
            let cores = core_sets.into_iter().map(|cpus| Core { id: 0, cpus }).collect();
            nodes.push(NumaNode { id: 0, cpus, cores, memory_bytes: None });
        }
        nodes.sort_by_key(|n| n.id);
        Topology::from_nodes(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwloc_agrees_with_sysfs_on_this_machine() {
        let hw = Topology::from_hwloc().unwrap();
        let sys = Topology::detect().unwrap();
        let cpus = |t: &Topology| t.nodes().iter().map(|n| (n.id, n.cpus.clone())).collect::<Vec<_>>();
        assert_eq!(cpus(&hw), cpus(&sys));
        assert_eq!(hw.num_physical_cores(), sys.num_physical_cores());
    }
}
